"""MONAI bundles in the Model Zoo layout: discovery, approval, loading and running on our Volume.

The fixtures are project-owned configs that mirror the structure of the Zoo's ``spleen_ct_segmentation``
(3D UNet, Orientationd/Spacingd/ScaleIntensityRanged, sliding window, Invertd, SaveImaged) and
``brats_mri_segmentation`` (SegResNet, 4 channels, NormalizeIntensityd, sigmoid, label values 1/2/4), at a
smaller size, with random weights saved by ``torch.save``. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.models.base import InputNotSupported
from inference.models.bundle import ModelLoadError, MonaiBundleModel, check_model, select_device
from inference.models.manifest import (BUILTIN_MODELS_DIR, UNAVAILABLE, bundle_checksum, load_manifests)
from inference.models.registry import load_model
from inference.volume import Volume

# An oblique, anisotropic grid (sagittal-like: columns along A, rows along -S, slices along -L).
AFFINE = np.array([[0.0, 0.0, -2.5, 10.0], [0.8, 0.0, 0.0, -20.0], [0.0, -0.9, 0.0, 30.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (12, 28, 24)


def volume(array: np.ndarray, affine: np.ndarray = AFFINE, modality: str = "CT") -> Volume:
    return Volume(array=array.astype(np.float32), affine=affine, frames=[], datasets=[], study_instance_uid="1.2",
                  series_instance_uid="1.2.3", frame_of_reference_uid=None, modality=modality, series_description="")


def sphere(center_ijk: tuple[float, float, float], radius_mm: float, shape=SHAPE, affine=AFFINE) -> np.ndarray:
    """Boolean ball of ``radius_mm`` around a voxel position, on the (k, j, i) grid of ``affine``."""
    k, j, i = np.indices(shape)
    points = affine @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    center = affine @ np.array([*center_ijk, 1.0])
    return (np.linalg.norm(points[:3].T - center[:3], axis=1) < radius_mm).reshape(shape)


def write_bundle(root: Path, name: str, config: dict, metadata: dict, network: torch.nn.Module | None) -> Path:
    folder = root / name
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "docs").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4))
    (folder / "docs" / "README.md").write_text(f"# {name}\nTest fixture.\n")
    if network is not None:
        torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def zoo_metadata(modality: str, inputs: dict[str, str], outputs: dict[str, str], **extra) -> dict:
    return {
        "schema": "https://example.invalid/meta_schema.json", "version": "0.5.9", "monai_version": "1.6.1",
        "task": "Test segmentation", "description": "A test bundle", "authors": "tests",
        "intended_use": "This is an example, not to be used for diagnostic purposes",
        "eval_metrics": {"mean_dice": 0.96},
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": modality,
                                 "num_channels": len(inputs), "spatial_shape": [32, 32, 32], "dtype": "float32",
                                 "is_patch_data": True, "channel_def": inputs}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(outputs),
                                 "spatial_shape": [32, 32, 32], "dtype": "float32", "is_patch_data": True,
                                 "channel_def": outputs}}},
        **extra}


def spleen_config(network_def: dict | None = None, postprocessing: list | None = None) -> dict:
    """Mirrors spleen_ct_segmentation's inference.json (smaller UNet and window)."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def or {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                                       "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1,
                                       "norm": "batch"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0,
             "b_max": 1, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 4},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4,
                    "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing or [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": ".nii.gz",
             "output_postfix": "trans", "separate_folder": True}]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }


def brats_config() -> dict:
    """Mirrors brats_mri_segmentation's inference.json (SegResNet 4 -> 3, sigmoid, labels 1/2/4), smaller."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "data_list_file_path": "$@bundle_root + '/configs/datalist.json'",
        "dataset_dir": "/workspace/data/medical/brats2018challenge",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": True,
        "network_def": {"_target_": "SegResNet", "blocks_down": [1, 1, 1], "blocks_up": [1, 1], "init_filters": 8,
                        "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 1,
                    "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "meta_keys": "pred_meta_dict", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
            {"_target_": "Lambdad", "keys": "pred",
             "func": "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))"},
            {"_target_": "SaveImaged", "keys": "pred", "meta_keys": "pred_meta_dict", "output_dir": "@output_dir",
             "output_postfix": "seg", "output_dtype": "uint8", "resample": False, "squeeze_end_dims": True}]},
    }


BRATS_SEGMENTS = [
    {"label": label, "name": name, "color": color,
     "category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically abnormal structure"},
     "type": {"value": code, "scheme": "SCT", "meaning": meaning}}
    for label, name, code, meaning, color in [
        (1, "Tumor core", "108369006", "Neoplasm", [255, 0, 0]),
        (2, "Edema", "79654002", "Edema", [0, 255, 0]),
        (4, "Enhancing tumor", "108369006", "Neoplasm", [255, 255, 0])]]


def spleen_unet() -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1, norm="batch")


@pytest.fixture()
def spleen(tmp_path: Path) -> Path:
    return write_bundle(tmp_path, "spleen_ct_segmentation", spleen_config(),
                        zoo_metadata("CT", {"0": "image"}, {"0": "background", "1": "spleen"}), spleen_unet())


@pytest.fixture()
def brats(tmp_path: Path) -> Path:
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    network = SegResNet(blocks_down=(1, 1, 1), blocks_up=(1, 1), init_filters=8, in_channels=4, out_channels=3)
    metadata = zoo_metadata("MR", {"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"},
                            {"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"},
                            orthanc_ai={"segments": BRATS_SEGMENTS})
    return write_bundle(tmp_path, "brats_mri_segmentation", brats_config(), metadata, network)


def force_load(manifest):
    """Build the model from its manifest, bypassing the registry's cache (which is keyed by id and checksum)."""
    import importlib

    from inference.models.registry import model_info

    module, _, name = manifest.entry.partition(":")
    return getattr(importlib.import_module(module), name)(model_info(manifest), dict(manifest.params))


def only(directory: Path, **kwargs):
    return [m for m in load_manifests([directory], **kwargs) if m.path.startswith(str(directory))][0]


def test_spleen_like_bundle_is_described_and_runs_on_the_source_grid(spleen: Path) -> None:
    manifest = only(spleen.parent, trusted=[spleen.parent])
    assert manifest.status == "available", manifest.reason
    assert (manifest.id, manifest.kind, manifest.modality, manifest.version) == (
        "spleen_ct_segmentation", "monai_bundle", "CT", "0.5.9")
    assert manifest.entry == "inference.models.bundle:MonaiBundleModel"
    assert manifest.sha256 == bundle_checksum(spleen) and manifest.demonstration
    assert manifest.segments[0]["label"] == 1 and manifest.segments[0]["type"]["value"] == "78961009"
    assert "mean_dice 0.96" in manifest.accuracy and "not measured here" in manifest.accuracy
    shown = manifest.to_json()
    assert shown["labels"] == [{"label": 1, "name": "spleen"}] and shown["status"] == "available"
    assert shown["inputs"] == [{"modality": "CT", "channel": 0, "name": "image"}]

    model = load_model(manifest)
    assert isinstance(model, MonaiBundleModel)
    names = [type(t).__name__ for t in model.pipeline.preprocessing.transforms]
    assert names == ["Orientationd", "Spacingd", "ScaleIntensityRanged", "EnsureTyped"]
    assert "SaveImaged" not in [type(t).__name__ for t in model.pipeline.postprocessing.transforms]
    assert not model.pipeline.amp  # the bundle asks for AMP; never on CPU

    image = np.random.default_rng(0).normal(60, 80, SHAPE)
    steps: list[float] = []
    result = model.segment(volume(image), steps.append)
    assert result.labels.shape == SHAPE and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1}
    assert steps[0] == 0.0 and steps[-1] == 1.0 and steps == sorted(steps)
    assert not (spleen / "eval").exists()  # SaveImaged was dropped


def test_geometry_round_trip_through_orientation_spacing_and_invertd(tmp_path: Path) -> None:
    """An identity network + threshold must give back the input object on the source grid."""
    config = spleen_config(network_def={"_target_": "torch.nn.Identity"}, postprocessing=[
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}])
    config["preprocessing"]["transforms"][4] = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0,
                                                "a_max": 100, "b_min": 0, "b_max": 1, "clip": True}
    write_bundle(tmp_path, "identity", config, zoo_metadata("CT", {"0": "image"}, {"0": "background",
                                                                                      "1": "object"}), None)
    torch.save({}, tmp_path / "identity" / "models" / "model.pt")
    model = load_model(only(tmp_path, trusted=[tmp_path]))
    target = sphere((7.0, 18.0, 4.0), 7.0)  # off centre: a flipped axis would miss it
    labels = model.segment(volume(target * 100.0), lambda f: None).labels.astype(bool)
    dice = 2 * (labels & target).sum() / (labels.sum() + target.sum())
    assert dice > 0.9, dice


def test_output_without_invertd_is_resampled_nearest_neighbour(tmp_path: Path) -> None:
    config = spleen_config(network_def={"_target_": "torch.nn.Identity"}, postprocessing=[
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}])
    config["preprocessing"]["transforms"][4] = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0,
                                                "a_max": 100, "b_min": 0, "b_max": 1, "clip": True}
    write_bundle(tmp_path, "no-invert", config, zoo_metadata("CT", {"0": "image"}, {"0": "background",
                                                                                       "1": "object"}), None)
    torch.save({}, tmp_path / "no-invert" / "models" / "model.pt")
    model = load_model(only(tmp_path, trusted=[tmp_path]))
    target = sphere((7.0, 18.0, 4.0), 7.0)
    labels = model.segment(volume(target * 100.0), lambda f: None).labels.astype(bool)
    assert labels.shape == SHAPE
    assert 2 * (labels & target).sum() / (labels.sum() + target.sum()) > 0.85


def test_brats_like_bundle_takes_four_series_resampled_onto_the_first(brats: Path) -> None:
    manifest = only(brats.parent, trusted=[brats.parent])
    assert manifest.status == "available", manifest.reason
    assert [s["label"] for s in manifest.segments] == [1, 2, 4]
    assert [i["name"] for i in manifest.params["inputs"]] == ["T1c", "T1", "T2", "FLAIR"]
    model = load_model(manifest)
    rng = np.random.default_rng(1)
    first = volume(rng.normal(100, 30, SHAPE), modality="MR")
    shifted = AFFINE.copy()
    shifted[:3, 3] += (3.0, -2.0, 1.0)
    others = [volume(rng.normal(100, 30, (10, 30, 20)), affine=shifted, modality="MR") for _ in range(3)]
    result = model.segment_channels([first, *others], lambda f: None)
    assert result.labels.shape == SHAPE and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1, 2, 4}
    with pytest.raises(InputNotSupported, match="needs 4 input series"):
        model.segment(first, lambda f: None)


def test_device_selection_and_sliding_window_overrides(spleen: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto").type == "cpu" and select_device("cuda").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto").type == "cuda" and select_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ModelLoadError, match="params.device"):
        select_device("tpu")
    monkeypatch.undo()

    manifest = only(spleen.parent, trusted=[spleen.parent])
    params = {**manifest.params, "device": "cpu", "sw_batch_size": 2, "overlap": 0.1}
    from inference.models.registry import model_info

    model = MonaiBundleModel(model_info(manifest), params)
    assert model.pipeline.inferer.sw_batch_size == 2 and model.pipeline.inferer.overlap == 0.1
    assert model.device.type == "cpu"


# --- approval and bad bundles ---------------------------------------------------------------------


def test_bundle_outside_trusted_directories_needs_approval_by_checksum(spleen: Path) -> None:
    listed = only(spleen.parent)
    assert listed.status == UNAVAILABLE and listed.sha256 == bundle_checksum(spleen)
    snippet = json.dumps({"AI": {"ApprovedModels": {"spleen_ct_segmentation": listed.sha256}}})
    assert listed.reason.startswith("not approved") and snippet in listed.reason
    with pytest.raises(ModelLoadError, match="not approved"):
        force_load(listed)

    approved = only(spleen.parent, approved={"spleen_ct_segmentation": listed.sha256})
    assert approved.status == "available" and approved.reason == ""

    (spleen / "configs" / "inference.json").write_text(
        (spleen / "configs" / "inference.json").read_text().replace('"overlap": 0.5', '"overlap": 0.25'))
    changed = only(spleen.parent, approved={"spleen_ct_segmentation": listed.sha256})
    assert changed.status == UNAVAILABLE and changed.reason.startswith("checksum changed")
    assert listed.sha256 in changed.reason and changed.sha256 in changed.reason


def test_bundle_changed_after_listing_is_refused_at_load(spleen: Path) -> None:
    manifest = only(spleen.parent, trusted=[spleen.parent])
    (spleen / "scripts").mkdir()
    (spleen / "scripts" / "__init__.py").write_text("import os\n")  # code a config could import
    with pytest.raises(ModelLoadError, match="changed after it was approved"):
        force_load(manifest)


def test_checksum_ignores_python_caches_and_covers_weights(spleen: Path) -> None:
    before = bundle_checksum(spleen)
    (spleen / "scripts" / "__pycache__").mkdir(parents=True)
    (spleen / "scripts" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    (spleen / "docs" / "README.md").write_text("edited docs are not code")
    assert bundle_checksum(spleen) == before
    with (spleen / "models" / "model.pt").open("ab") as stream:
        stream.write(b"\0")
    assert bundle_checksum(spleen) != before


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda b: (b / "configs" / "inference.json").write_text("{not json"), "configs/inference.json is not valid JSON"),
    (lambda b: (b / "configs" / "inference.json").unlink(), "configs/inference.json is missing"),
    (lambda b: (b / "configs" / "metadata.json").write_text("[1, 2]"), "configs/metadata.json must be a JSON object"),
    (lambda b: (b / "models" / "model.pt").unlink(), "weights are missing: models/model.pt"),
    (lambda b: (b / "configs" / "metadata.json").write_text(json.dumps(zoo_metadata("", {}, {}))),
     "does not name the input modality"),
])
def test_broken_bundle_is_listed_unavailable_without_hiding_others(spleen: Path, damage, reason: str) -> None:
    damage(spleen)
    manifests = load_manifests([BUILTIN_MODELS_DIR, spleen.parent], trusted=[spleen.parent, BUILTIN_MODELS_DIR])
    broken = next(m for m in manifests if m.path == str(spleen))
    assert broken.status == UNAVAILABLE and reason in broken.reason, broken.reason
    assert broken.id == "spleen_ct_segmentation" and json.dumps(broken.to_json())
    assert {"brain-lesion-candidates", "brain-lesion-unet"} <= {m.id for m in manifests if m.available}
    with pytest.raises(ModelLoadError, match="unavailable"):
        force_load(broken)


def test_weights_that_do_not_match_the_network(spleen: Path) -> None:
    from monai.networks.nets import UNet

    torch.save(UNet(3, 1, 2, (8, 16, 32), (2, 2)).state_dict(), spleen / "models" / "model.pt")
    manifest = only(spleen.parent, trusted=[spleen.parent])
    assert manifest.available  # only loading can tell
    checked = check_model(manifest)
    assert checked.status == UNAVAILABLE and "do not match the network definition" in checked.reason
    with pytest.raises(ModelLoadError, match="do not match"):
        force_load(manifest)


def test_config_that_cannot_be_instantiated(spleen: Path) -> None:
    config = spleen_config()
    config["inferer"]["_target_"] = "NoSuchInferer"
    (spleen / "configs" / "inference.json").write_text(json.dumps(config))
    checked = check_model(only(spleen.parent, trusted=[spleen.parent]))
    assert checked.status == UNAVAILABLE and "cannot be instantiated" in checked.reason


# --- our own brain-lesion network -----------------------------------------------------------------


def test_brain_lesion_unet_metadata_is_honest() -> None:
    manifest = next(m for m in load_manifests([BUILTIN_MODELS_DIR]) if m.id == "brain-lesion-unet")
    assert manifest.available and manifest.kind == "monai_bundle" and manifest.demonstration
    assert manifest.modality == "MR" and manifest.segments[0]["type"]["value"] == "52988006"
    metadata = json.loads((Path(manifest.path) / "configs" / "metadata.json").read_text())
    assert "not for diagnosis" in metadata["intended_use"].lower()
    assert "brain1" in manifest.accuracy and "Dice" in manifest.accuracy
    assert "mr_brain" in manifest.trained_on or "dcm_qa_decubitus" in manifest.trained_on
    assert (Path(manifest.path) / "models" / "model.pt").stat().st_size < 4_000_000


def test_brain_lesion_unet_on_a_real_series_is_deterministic(shared_data: Path) -> None:
    from inference.volume import volume_from_files

    series = volume_from_files(sorted((shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm")))
    manifest = next(m for m in load_manifests([BUILTIN_MODELS_DIR]) if m.id == "brain-lesion-unet")
    model = load_model(manifest)
    runs = [model.segment(series, lambda f: None) for _ in range(3)]
    labels = runs[0].labels
    assert labels.shape == series.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    assert all(np.array_equal(labels, run.labels) for run in runs[1:])
    assert "not for diagnosis" in runs[0].notes[0]


def test_brain_lesion_unet_finds_a_phantom_and_the_training_script_runs(tmp_path: Path, shared_data: Path) -> None:
    """Two training iterations (so the script cannot rot), and a loose floor on a fresh phantom case."""
    from inference.models.training import train_brain_lesion as training

    figures = training.train(2, 2, tmp_path / "model.pt", threads=torch.get_num_threads(), log_every=1)
    assert figures["iterations"] == 2 and (tmp_path / "model.pt").stat().st_size > 100_000

    anatomy = training.load_anatomy(shared_data)[0]
    center = anatomy.centers[len(anatomy.centers) // 2]
    k, j, i = np.indices(anatomy.volume.shape)
    spacing = anatomy.volume.spacing
    reference = np.sqrt(((k - center[0]) * spacing[0]) ** 2 + ((j - center[1]) * spacing[1]) ** 2
                        + ((i - center[2]) * spacing[2]) ** 2) < 9.0  # an obvious 18 mm bright lesion
    array = anatomy.volume.array.copy()
    array[reference] += 0.8 * anatomy.reference
    case = volume(array, affine=anatomy.volume.affine, modality="MR")
    manifest = next(m for m in load_manifests([BUILTIN_MODELS_DIR]) if m.id == "brain-lesion-unet")
    predicted = load_model(manifest).segment(case, lambda f: None).labels > 0
    assert (predicted & reference).sum() > 0.5 * reference.sum()
