"""TorchScript models with a small manifest: discovery, approval, preprocessing from params, source grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.models.base import InputNotSupported
from inference.models.bundle import ModelLoadError
from inference.models.manifest import UNAVAILABLE, files_checksum, load_manifests
from inference.models.registry import load_model
from inference.models.torchscript import TorchScriptModel, TorchScriptParams
from tests.unit.test_bundle import AFFINE, SHAPE, force_load, sphere, volume

SEGMENT = {"label": 1, "name": "Object", "color": [255, 0, 0],
           "category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically abnormal structure"},
           "type": {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"}}


class Threshold(torch.nn.Module):
    """Two-channel logits (x < 0.5, x > 0.5) of the first input channel: argmax = threshold at 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:, :1]
        return torch.cat([0.5 - first, first - 0.5], dim=1)


class Bands(torch.nn.Module):
    """Three sigmoid channels: x > 0.2, x > 0.5, x > 0.8 (logits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:, :1] * 20
        return torch.cat([first - 4, first - 10, first - 16], dim=1)


def write_model(root: Path, name: str, module: torch.nn.Module, params: dict, segments: list | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    torch.jit.script(module).save(str(folder / "model.ts"))
    manifest = {"id": name, "name": f"{name} (test)", "version": "1.0", "task": "segmentation", "modality": "CT",
                "kind": "torchscript", "segments": segments or [SEGMENT], "params": params}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def listed(root: Path, **kwargs):
    return next(m for m in load_manifests([root], **kwargs) if m.path.startswith(str(root)))


def test_torchscript_model_runs_with_declared_preprocessing_on_the_source_grid(tmp_path: Path) -> None:
    params = {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "patch_size": [16, 16, 16], "overlap": 0.25,
              "normalization": {"method": "range", "a_min": 0, "a_max": 100}, "sw_batch_size": 2}
    folder = write_model(tmp_path, "threshold", Threshold(), params)
    manifest = listed(tmp_path, trusted=[tmp_path])
    assert manifest.status == "available", manifest.reason
    assert manifest.entry == "inference.models.torchscript:TorchScriptModel"
    assert manifest.sha256 == files_checksum(folder, ["manifest.json", "model.ts"])
    model = load_model(manifest)
    assert isinstance(model, TorchScriptModel)
    target = sphere((7.0, 18.0, 4.0), 7.0)
    runs = [model.segment(volume(target * 100.0), lambda f: None).labels for _ in range(3)]
    labels = runs[0]
    assert labels.shape == SHAPE and labels.dtype == np.uint8
    assert 2 * (labels.astype(bool) & target).sum() / (labels.astype(bool).sum() + target.sum()) > 0.9
    assert all(np.array_equal(labels, run) for run in runs[1:])


def test_sigmoid_outputs_map_to_declared_label_values_and_2d_patches_run_slice_by_slice(tmp_path: Path) -> None:
    segments = [{**SEGMENT, "label": value, "name": f"band {value}"} for value in (1, 2, 4)]
    params = {"orientation": "", "patch_size": [16, 16], "activation": "sigmoid", "label_values": [1, 2, 4],
              "normalization": {"method": "window", "center": 50, "width": 100}}
    write_model(tmp_path, "bands", Bands(), params, segments)
    model = load_model(listed(tmp_path, trusted=[tmp_path]))
    ramp = np.broadcast_to(np.linspace(0, 100, SHAPE[2]), SHAPE)  # along the columns
    labels = model.segment(volume(ramp.copy()), lambda f: None).labels
    assert labels.shape == SHAPE
    assert labels[0, 0, 0] == 0 and labels[0, 0, -1] == 4 and set(np.unique(labels)) == {0, 1, 2, 4}
    assert (np.diff(labels[0, 0].astype(int)) >= 0).all()


def test_several_channels_are_resampled_onto_the_first_series(tmp_path: Path) -> None:
    params = {"channels": ["T1", "FLAIR"], "orientation": "RAS", "patch_size": [16, 16, 16],
              "normalization": {"method": "zscore", "nonzero": True}}
    write_model(tmp_path, "two", Threshold(), params)
    model = load_model(listed(tmp_path, trusted=[tmp_path]))
    other = AFFINE.copy()
    other[:3, 3] += 5.0
    first = volume(np.random.default_rng(0).normal(size=SHAPE))
    result = model.segment_channels([first, volume(np.ones((8, 20, 20)), affine=other)], lambda f: None)
    assert result.labels.shape == SHAPE and result.labels.dtype == np.uint8
    with pytest.raises(InputNotSupported, match="needs 2 series"):
        model.segment(first, lambda f: None)


def test_torchscript_model_needs_approval_outside_trusted_directories(tmp_path: Path) -> None:
    write_model(tmp_path, "threshold", Threshold(), {"patch_size": [16, 16, 16]})
    manifest = listed(tmp_path)
    assert manifest.status == UNAVAILABLE and '"ApprovedModels": {"threshold": "' in manifest.reason
    assert listed(tmp_path, approved={"threshold": manifest.sha256}).available
    with pytest.raises(ModelLoadError, match="not approved"):
        force_load(manifest)


def test_missing_or_changed_model_file(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "threshold", Threshold(), {"patch_size": [16, 16, 16]})
    manifest = listed(tmp_path, trusted=[tmp_path])
    torch.jit.script(Bands()).save(str(folder / "model.ts"))
    with pytest.raises(ModelLoadError, match="changed after it was approved"):
        force_load(manifest)
    (folder / "model.ts").unlink()
    missing = listed(tmp_path, trusted=[tmp_path])
    assert missing.status == UNAVAILABLE and "model.ts is missing" in missing.reason


@pytest.mark.parametrize(("params", "message"), [
    ({"normalization": {"method": "magic"}}, "normalization.method"),
    ({"patch_size": [16]}, "patch_size"),
    ({"activation": "relu"}, "activation"),
])
def test_bad_params_are_refused(params: dict, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        TorchScriptParams.from_dict(params)


def test_a_file_that_is_not_torchscript_is_refused_at_load(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "threshold", Threshold(), {"patch_size": [16, 16, 16]})
    (folder / "model.ts").write_bytes(b"not a zip archive")
    from inference.models.bundle import check_model

    checked = check_model(listed(tmp_path, trusted=[tmp_path]))
    assert checked.status == UNAVAILABLE and "cannot be loaded as TorchScript" in checked.reason
