"""The HoVer-Net model path: a MONAI Model Zoo bundle layout with random weights (no weights are shipped)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("tiffslide", reason="the slide readers are not installed: run `make test`")

from inference.pathology.hovernet import PANNUKE_CLASSES, BundleError, HoVerNetDetector  # noqa: E402


def make_bundle(folder: Path, *, class_names: list[str] | None = None, out_classes: int = 6) -> Path:
    """The Zoo layout: configs/metadata.json, configs/inference.json (network_def), models/model.pt."""
    from monai.networks.nets import HoVerNet

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    metadata = {"version": "0.0.1", "name": "random-hovernet", "mpp": 0.5,
                "network_data_format": {"outputs": {"type_prediction": {"channel_def": {"0": "background"}}}}}
    if class_names:
        metadata["class_names"] = class_names
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (folder / "configs" / "inference.json").write_text(json.dumps({
        "hovernet_mode": "fast", "patch_size": 256, "out_size": 164,
        "network_def": {"_target_": "HoVerNet", "mode": "@hovernet_mode", "in_channels": 3,
                        "out_classes": out_classes}}))
    torch.manual_seed(0)
    torch.save({"model": HoVerNet(mode="fast", in_channels=3, out_classes=out_classes).state_dict()},
               folder / "models" / "model.pt")
    return folder


def test_bundle_loads_and_segments_a_tile(tmp_path):
    detector = HoVerNetDetector.from_bundle(make_bundle(tmp_path / "b"), device="cpu", core_px=100, margin_px=32)
    info = detector.info
    assert info.method == "network" and info.mpp == 0.5 and info.version == "0.0.1"
    assert info.classes == ("Nucleus (unclassified)", *PANNUKE_CLASSES)  # 6 outputs: PanNuke
    tile = np.full((164, 164, 3), 235, np.uint8)  # core + margins = one 256 px network patch after padding
    tile[60:90, 60:90] = (70, 45, 130)
    (labels, classes, probs), = detector.detect([tile])
    assert labels.shape == (164, 164) and labels.dtype == np.int32
    assert len(classes) == len(probs) == labels.max() + 1
    assert ((classes >= 0) & (classes < len(info.classes))).all()


def test_bundle_errors_name_what_is_missing(tmp_path):
    with pytest.raises(BundleError, match="metadata.json"):
        HoVerNetDetector.from_bundle(tmp_path, device="cpu")
    folder = make_bundle(tmp_path / "b", class_names=["A", "B", "C", "D"], out_classes=5)
    (folder / "models" / "model.pt").unlink()
    with pytest.raises(BundleError, match="model.pt"):
        HoVerNetDetector.from_bundle(folder, device="cpu")
