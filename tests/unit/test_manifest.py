"""Model manifests (stdlib, shared with the plugin) and the worker-side registry."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference.models.manifest import BUILTIN_MODELS_DIR, ManifestError, ModelManifest, load_manifests

REPO = Path(__file__).resolve().parents[2]
BUILTIN = BUILTIN_MODELS_DIR / "brain-lesion-candidates" / "manifest.json"


def builtin_data() -> dict:
    return json.loads(BUILTIN.read_text())


def write_model(root: Path, folder: str, data: dict) -> Path:
    path = root / folder / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def test_builtin_manifest_loads() -> None:
    manifests = load_manifests([BUILTIN_MODELS_DIR])
    manifest = next(m for m in manifests if m.id == "brain-lesion-candidates")
    assert isinstance(manifest, ModelManifest)
    assert manifest.kind == "builtin" and manifest.task == "segmentation" and manifest.modality == "MR"
    assert manifest.entry == "inference.models.intensity_outlier:IntensityOutlierModel"
    assert manifest.demonstration is True
    assert "classical" in manifest.name.lower()
    assert "Dice" in manifest.accuracy and "not validated" in manifest.accuracy
    assert manifest.trained_on.startswith("Not trained")
    assert manifest.sha256 == hashlib.sha256(BUILTIN.read_bytes()).hexdigest()
    seg = manifest.segments[0]
    assert seg["label"] == 1 and seg["type"]["value"] == "52988006" and seg["category"]["value"] == "49755003"
    shown = manifest.to_json()
    json.dumps(shown)  # serializable for the REST API
    assert shown["id"] == "brain-lesion-candidates" and shown["demonstration"] is True
    assert shown["labels"] == [{"label": 1, "name": "Lesion candidate"}]


def test_manifest_module_is_stdlib_only() -> None:
    code = ("import sys; import inference.models.manifest as m; m.load_manifests([m.BUILTIN_MODELS_DIR]); "
            "heavy = {'numpy', 'scipy', 'skimage', 'pydicom', 'torch'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("key", ["id", "entry", "segments", "modality"])
def test_missing_key_names_file_and_key(tmp_path: Path, key: str) -> None:
    data = builtin_data()
    del data[key]
    path = write_model(tmp_path, "broken", data)
    with pytest.raises(ManifestError) as caught:
        load_manifests([tmp_path])
    assert f"'{key}'" in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize(("key", "value"), [("params", []), ("demonstration", "yes"), ("version", 1), ("name", "")])
def test_wrong_type_names_key(tmp_path: Path, key: str, value: object) -> None:
    write_model(tmp_path, "broken", {**builtin_data(), key: value})
    with pytest.raises(ManifestError, match=f"'{key}'"):
        load_manifests([tmp_path])


@pytest.mark.parametrize("change", [{"label": True}, {"label": 0}, {"color": [255, 64]}, {"type": {"value": "1"}}])
def test_bad_segment_is_refused(tmp_path: Path, change: dict) -> None:
    data = builtin_data()
    data["segments"] = [{**data["segments"][0], **change}]
    write_model(tmp_path, "broken", data)
    with pytest.raises(ManifestError, match=r"segments\[0\]"):
        load_manifests([tmp_path])


def test_invalid_json_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad" / "manifest.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifests([tmp_path])


def test_duplicate_id_names_both_files(tmp_path: Path) -> None:
    copy = write_model(tmp_path, "again", builtin_data())
    with pytest.raises(ManifestError, match="defined twice") as caught:
        load_manifests([BUILTIN_MODELS_DIR, tmp_path])
    assert str(BUILTIN) in str(caught.value) and str(copy) in str(caught.value)


def test_extra_directory_adds_models_and_missing_one_is_skipped(tmp_path: Path) -> None:
    write_model(tmp_path, "other", {**builtin_data(), "id": "other-model"})
    ids = [m.id for m in load_manifests([BUILTIN_MODELS_DIR, tmp_path, tmp_path / "absent"])]
    assert ids[0] == "brain-lesion-candidates" and "other-model" in ids


def test_registry_loads_and_caches_the_builtin_model(tmp_path: Path) -> None:
    from inference.models.intensity_outlier import IntensityOutlierModel
    from inference.models.registry import load_model

    manifest = next(m for m in load_manifests([BUILTIN_MODELS_DIR]) if m.id == "brain-lesion-candidates")
    model = load_model(manifest)
    assert isinstance(model, IntensityOutlierModel)
    assert model.info.id == manifest.id and model.info.version == "0.1.0" and model.info.demonstration
    segment = model.info.segments[0]
    assert segment.label == 1 and segment.type.value == "52988006" and segment.color == (255, 64, 64)
    assert model.params.z_threshold == manifest.params["z_threshold"]
    assert load_model(manifest) is model

    changed = {**builtin_data(), "params": {**manifest.params, "z_threshold": 4.0}}
    write_model(tmp_path, "changed", changed)
    reloaded = load_model(load_manifests([tmp_path])[0])
    assert reloaded is not model and reloaded.params.z_threshold == 4.0


def test_status_is_shown_and_the_builtin_demo_bundle_is_trusted() -> None:
    manifests = {m.id: m for m in load_manifests([BUILTIN_MODELS_DIR])}
    shown = manifests["brain-lesion-candidates"].to_json()
    assert shown["status"] == "available" and shown["reason"] == ""
    bundle = manifests["brain-lesion-unet"]
    assert bundle.kind == "monai_bundle" and bundle.available and len(bundle.sha256) == 64


def test_folders_without_a_model_are_skipped_and_torchscript_needs_its_file(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    data = {**builtin_data(), "id": "ts-model", "kind": "torchscript"}
    del data["entry"]
    write_model(tmp_path, "ts", data)
    [manifest] = load_manifests([tmp_path])
    assert manifest.entry == "inference.models.torchscript:TorchScriptModel"
    assert manifest.status == "unavailable" and "model.ts is missing" in manifest.reason
    assert manifest.to_json()["status"] == "unavailable"
