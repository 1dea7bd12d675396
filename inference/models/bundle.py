"""Run a MONAI bundle (Model Zoo layout) as its ``configs/inference.json`` describes it, on our ``Volume``.

The bundle's own ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` run, parsed by
``monai.bundle.ConfigParser``. We change only what running offline inside a worker requires, and say so:

- **Input.** ``LoadImage(d)``, ``EnsureChannelFirst(d)`` and the older ``AddChannel(d)`` are removed from
  ``preprocessing``. In their place the image is given as what they would have produced from a NIfTI
  file of the same series: a channel-first float32 ``MetaTensor`` (C, i, j, k) -- i the DICOM column,
  j the row, k the slice index -- whose affine maps voxel indices to RAS mm (our LPS affine with x and y
  negated), with ``original_affine``, ``spatial_shape`` and ``space`` = "RAS" in its meta data. Extra
  channels (multi-sequence bundles) are resampled onto the grid of the first series.
- **Output files.** ``Save*`` transforms are removed from ``postprocessing``: results go back as DICOM.
- **Memory.** Resampling transforms (``Spacing(d)``, ``SpatialResample(d)``, ``ResampleToMatch(d)``) get
  ``dtype`` float32 instead of MONAI's float64 default, so that neither the image nor the probabilities
  that ``Invertd`` resamples back are ever float64.
- **Environment.** ``bundle_root`` is the bundle folder, ``device`` the configured device, any ``num_workers``
  0 (no forked loaders in the worker), ``pretrained`` flags in ``network_def`` false (no downloads).
- **Engine.** Instead of the bundle's ``evaluator`` (an ignite engine with loaders and handlers) we run
  ``inferer(image[None], network)`` once under ``torch.inference_mode()``, with mixed precision only on
  CUDA and only if the bundle asks for it (``amp``). Weights are loaded the way the Zoo's
  ``CheckpointLoader`` does: ``models/model.pt`` (a state dict) strictly into ``network_def``, or
  ``models/model.ts`` with ``torch.jit.load``.
- **Back to the source grid.** The bundle's ``Invertd`` (when it has one) already brings the prediction
  back; otherwise the label map is resampled nearest-neighbour from its affine onto the source grid.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import ndimage as ndi

from inference.models.base import InputNotSupported, ModelInfo, ProgressCallback, SegmentationResult
from inference.models.manifest import ModelManifest, bundle_checksum, unavailable
from inference.volume import Volume

# Maps LPS (DICOM patient) coordinates to RAS (NIfTI / MONAI) and back: x and y change sign.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_INPUT_LOADERS = frozenset({"LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd",
                            "AddChannel", "AddChanneld"})
_RESAMPLERS = frozenset({"Spacing", "Spacingd", "SpatialResample", "SpatialResampled", "ResampleToMatch",
                         "ResampleToMatchd"})
_REFERENCE = re.compile(r"^\$?@([\w#:]+)$")


class ModelLoadError(RuntimeError):
    """A model cannot be loaded or run as installed; the message says why and what to do."""


# --- devices --------------------------------------------------------------------------------------


def select_device(requested: str | None = "auto") -> torch.device:
    """"auto" (default): CUDA when available, else CPU; "cuda[:n]" falls back to CPU when there is no GPU."""
    wanted = (requested or "auto").strip().lower()
    if wanted in ("auto", "cuda") or wanted.startswith("cuda:"):
        if torch.cuda.is_available():
            return torch.device("cuda" if wanted == "auto" else wanted)
        return torch.device("cpu")
    if wanted != "cpu":
        raise ModelLoadError(f"params.device must be 'auto', 'cpu' or 'cuda[:n]', not {requested!r}")
    return torch.device("cpu")


# --- geometry: Volume <-> MONAI -------------------------------------------------------------------


def ras_affine(volume: Volume) -> np.ndarray:
    """The affine of ``volume`` in MONAI's convention: (i, j, k, 1) -> RAS mm."""
    return LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64)


def resample_onto(source: Volume, target: Volume, *, order: int = 1) -> np.ndarray:
    """``source.array`` resampled onto the (k, j, i) grid of ``target`` (float32; 0 outside the source).

    Works slice by slice of the target, so memory stays at one slice of coordinates.
    """
    if source.shape == target.shape and np.allclose(source.affine, target.affine, atol=1e-4):
        return np.asarray(source.array, dtype=np.float32)
    to_source = np.linalg.inv(source.affine) @ target.affine  # target (i, j, k) -> source (i, j, k)
    out = np.empty(target.shape, dtype=np.float32)
    rows, columns = target.shape[1:]
    jj, ii = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(columns, dtype=np.float64), indexing="ij")
    for k in range(target.shape[0]):
        points = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, float(k)), np.ones(ii.size)])
        src = (to_source @ points)[:3]
        coordinates = src[::-1]  # (k, j, i) order of the array
        out[k] = ndi.map_coordinates(source.array, coordinates, order=order, mode="constant", cval=0.0,
                                     prefilter=False).reshape(rows, columns)
    return out


def image_from_volumes(volumes: Sequence[Volume]):
    """Channel-first MetaTensor (C, i, j, k) with a RAS affine: what LoadImaged + EnsureChannelFirstd give."""
    from monai.data import MetaTensor

    if not volumes:
        raise ValueError("at least one volume is needed")
    first = volumes[0]
    channels = [np.asarray(first.array, dtype=np.float32)]
    channels += [resample_onto(volume, first) for volume in volumes[1:]]
    array = np.stack([np.transpose(c, (2, 1, 0)) for c in channels])  # (C, i, j, k), contiguous copy
    del channels
    affine = ras_affine(first)
    shape_ijk = np.array(array.shape[1:])
    meta = {"original_affine": affine.copy(), "spatial_shape": shape_ijk, "original_channel_dim": 0,
            "space": "RAS", "filename_or_obj": first.series_instance_uid or first.series_description,
            "modality": first.modality}
    return MetaTensor(torch.from_numpy(array), affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def labels_on_source_grid(output: torch.Tensor, volume: Volume) -> np.ndarray:
    """A post-processed prediction (label values; [1,] i, j, k; RAS affine in its meta) as uint8 (k, j, i).

    Several binary channels become labels 1..C (a later channel wins where they overlap). When the output
    is not on the source grid it is resampled nearest-neighbour using its affine.
    """
    affine = getattr(output, "affine", None)
    array = torch.as_tensor(output).detach().to("cpu")
    if array.ndim == 4:
        if array.shape[0] == 1:
            array = array[0]
        else:
            merged = torch.zeros(array.shape[1:], dtype=torch.uint8)
            for channel in range(array.shape[0]):
                merged[array[channel] > 0.5] = channel + 1
            array = merged
    if array.ndim != 3:
        raise ModelLoadError(f"the model's output has shape {tuple(array.shape)}; a 3D label map was expected")
    if array.is_floating_point():
        array = torch.round(array)
    low, high = (int(array.min()), int(array.max())) if array.numel() else (0, 0)
    if low < 0 or high > 255:
        raise ModelLoadError(f"the model's output holds values {low}..{high}; label values 0..255 were expected "
                             "(is the bundle's post-processing missing an argmax or threshold?)")
    labels = array.to(torch.uint8).numpy()
    target_shape = tuple(reversed(volume.shape))  # (i, j, k)
    target_affine = ras_affine(volume)
    out_affine = None if affine is None else np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)
    if labels.shape == target_shape and (out_affine is None or np.allclose(out_affine, target_affine, atol=1e-3)):
        return np.ascontiguousarray(np.transpose(labels, (2, 1, 0)))
    if out_affine is None:
        raise ModelLoadError(f"the model's output has shape {labels.shape}, not the input's {target_shape}, "
                             "and carries no affine to map it back")
    grid = Volume(array=np.transpose(labels, (2, 1, 0)), affine=np.linalg.inv(LPS_TO_RAS) @ out_affine,
                  frames=[], datasets=[], study_instance_uid="", series_instance_uid="",
                  frame_of_reference_uid=None, modality="", series_description="")
    return resample_onto(grid, volume, order=0).astype(np.uint8)


# --- the pipeline that runs a network ---------------------------------------------------------------


@dataclass
class MonaiPipeline:
    """preprocessing -> inferer(network) -> postprocessing on dict data, as a MONAI evaluator would run it."""

    preprocessing: Callable[[dict], dict]
    network: Callable[[torch.Tensor], Any]
    inferer: Callable[..., Any]
    postprocessing: Callable[[dict], dict] | None
    device: torch.device
    amp: bool = False
    input_key: str = "image"
    output_key: str = "pred"
    channels: int | None = None  # input series the network takes (from the metadata); None: not checked

    def run(self, volumes: Sequence[Volume], progress: ProgressCallback) -> torch.Tensor:
        """The post-processed prediction for the volumes (one channel each), on the CPU."""
        progress(0.0)
        with torch.inference_mode():
            data = {self.input_key: image_from_volumes(volumes)}
            data = self.preprocessing(data)
            progress(0.15)
            batch = data[self.input_key].unsqueeze(0).to(self.device)
            network = _counting(self.network, _window_count(self.inferer, batch),
                                lambda f: progress(0.15 + 0.7 * f))
            autocast = torch.autocast("cuda") if self.amp and self.device.type == "cuda" else contextlib.nullcontext()
            with autocast:
                prediction = self.inferer(batch, network)
            if isinstance(prediction, (tuple, list)):
                prediction = prediction[0]
            elif isinstance(prediction, dict):
                prediction = prediction.get(self.output_key, next(iter(prediction.values())))
            del batch
            data[self.output_key] = prediction[0].float().to("cpu")
            del prediction
            data[self.input_key] = data[self.input_key].to("cpu")
            progress(0.85)
            if self.postprocessing is not None:
                data = self.postprocessing(data)
            progress(1.0)
            return data[self.output_key]

    def segment(self, info: ModelInfo, volumes: Sequence[Volume], progress: ProgressCallback) -> SegmentationResult:
        """Run on the volumes and return a uint8 label map on the first volume's grid, undescribed labels removed."""
        if self.channels is not None and self.channels != len(volumes):
            raise InputNotSupported(f"{info.name} needs {self.channels} input series (channels), got {len(volumes)}")
        for volume in volumes:
            if volume.array.ndim != 3:
                raise InputNotSupported(f"{info.name} needs a 3D series; this one has shape {volume.array.shape}")
        labels = labels_on_source_grid(self.run(volumes, progress), volumes[0])
        notes: list[str] = []
        known = {segment.label for segment in info.segments}
        unknown = sorted(set(np.unique(labels).tolist()) - known - {0})
        if unknown:
            labels[np.isin(labels, unknown)] = 0
            notes.append(f"label values {unknown} produced by the model have no segment description and were left "
                         "out (describe them in the model's segments)")
        if info.demonstration:
            notes.insert(0, f"{info.name}: demonstration model, not for diagnosis.")
        return SegmentationResult(labels=labels, notes=notes)


def _window_count(inferer: Any, batch: torch.Tensor) -> int | None:
    """How many network calls a sliding-window inferer will make (for progress); None when unknown."""
    roi = getattr(inferer, "roi_size", None)
    if roi is None:
        return None
    spatial = list(batch.shape[2:])
    slice_dim = getattr(inferer, "spatial_dim", None)
    slices = 1
    if slice_dim is not None and len(spatial) == 3 and len(roi) == 2:  # SliceInferer: 2D windows per slice
        slices = spatial.pop(int(slice_dim))
    overlap = getattr(inferer, "overlap", 0.25)
    overlaps = overlap if isinstance(overlap, (list, tuple)) else [overlap] * len(spatial)
    windows = 1
    for size, r, o in zip(spatial, roi, overlaps):
        r = min(int(r), size) if int(r) > 0 else size
        step = max(1, int(r * (1 - float(o))))
        windows *= 1 if size <= r else math.ceil((size - r) / step) + 1
    per_call = max(1, int(getattr(inferer, "sw_batch_size", 1)))
    return max(1, math.ceil(windows / per_call) * slices)


def _counting(network: Callable, total: int | None, report: Callable[[float], None]) -> Callable:
    """The network, reporting the fraction of calls done (the inferer calls it once per window batch)."""
    if not total:
        return network
    calls = [0]

    def call(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] % max(1, total // 20) == 0:
            report(min(1.0, calls[0] / total))
        return network(*args, **kwargs)
    return call


# --- reading a bundle ------------------------------------------------------------------------------


def _target_name(item: Any) -> str:
    target = item.get("_target_") if isinstance(item, dict) else None
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else ""


def _is_file_writer(name: str) -> bool:
    return name.startswith("Save") or name in ("WriteFileMapping",)


def _transform_list(parser: Any, key: str) -> tuple[str, list] | None:
    """(config id, list) of the transforms of a Compose section, when the list is written out in the config."""
    node = parser.get(key)
    if isinstance(node, list):
        return key, node
    if isinstance(node, dict):
        transforms = node.get("transforms")
        if isinstance(transforms, list):
            return f"{key}#transforms", transforms
        if isinstance(transforms, str) and (match := _REFERENCE.match(transforms)):
            referenced = parser.get(match.group(1))
            if isinstance(referenced, list):
                return match.group(1), referenced
    return None


def _edit_transforms(parser: Any, key: str, drop: Callable[[str], bool]) -> list[str]:
    """Remove matching transforms from a Compose section of the config and make resamplers float32."""
    located = _transform_list(parser, key)
    if located is None:
        return []
    config_id, items = located
    kept, dropped = [], []
    for item in copy.deepcopy(items):
        name = _target_name(item)
        if drop(name):
            dropped.append(name)
            continue
        if name in _RESAMPLERS:
            item["dtype"] = "$torch.float32"
        kept.append(item)
    parser[config_id] = kept
    return dropped


def _drop_instances(compose: Any, drop: Callable[[str], bool]) -> None:
    """Remove matching transforms from an instantiated Compose (for lists built by expressions)."""
    transforms = getattr(compose, "transforms", None)
    if isinstance(transforms, (list, tuple)):
        compose.transforms = type(transforms)(t for t in transforms if not drop(type(t).__name__))


def _no_pretrained(config: Any) -> Any:
    """A copy of a network definition with every ``pretrained`` flag false (they download weights)."""
    if isinstance(config, dict):
        return {k: (False if k == "pretrained" else _no_pretrained(v)) for k, v in config.items()}
    if isinstance(config, list):
        return [_no_pretrained(v) for v in config]
    return config


def _state_dict(checkpoint: Any, path: Path) -> dict:
    """The network state dict in a checkpoint: a plain state dict, or one under 'model'/'state_dict'/'network'."""
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict", "network"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelLoadError(f"{path} does not hold a network state dict")
    if checkpoint and all(k.startswith("module.") for k in checkpoint):  # saved from DataParallel
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def load_weights(network: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load a state dict strictly into ``network``; a mismatch raises ModelLoadError naming the keys."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ModelLoadError(f"{path} cannot be read as PyTorch weights ({exc})") from exc
    state = _state_dict(checkpoint, path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise ModelLoadError(f"the weights in {path.name} do not match the network definition: {detail}") from exc
    return network


def _config_value(parser: Any, key: str, default: Any) -> Any:
    try:
        return parser.get(key, default)
    except Exception:  # malformed ids in foreign configs
        return default


class MonaiBundleModel:
    """A MONAI bundle as a segmentation model.

    ``params`` (filled in by model discovery; the last four may be set in ``orthanc_ai.params`` of the
    bundle's metadata.json):
    - ``bundle``: the bundle folder; ``config``: its inference config relative to it (configs/inference.json);
    - ``weights``: models/model.pt (state dict into ``network_def``) or models/model.ts (TorchScript);
    - ``sha256``: the checksum that was approved; the files are checked against it again before loading;
    - ``input_key`` / ``output_key``: the data keys of the image and the prediction ("image", "pred");
    - ``device``: "auto" (CUDA when available), "cpu" or "cuda[:n]";
    - ``sw_batch_size``, ``overlap``: override the bundle inferer's sliding-window settings (None: keep);
    - ``amp``: mixed precision on CUDA (None: as the bundle says; never on CPU).
    """

    def __init__(self, info: ModelInfo, params: dict[str, Any]) -> None:
        self.info = info
        if params.get("unavailable_reason"):
            raise ModelLoadError(f"model {info.id} is unavailable: {params['unavailable_reason']}")
        if not params.get("bundle"):
            raise ModelLoadError(f"model {info.id}: params.bundle (the bundle folder) is missing")
        self.root = Path(params["bundle"])
        expected = params.get("sha256")
        if expected:
            actual = bundle_checksum(self.root)
            if actual != expected:
                raise ModelLoadError(f"the files of bundle {self.root} changed after it was approved (sha256 "
                                     f"{actual}, approved {expected}); reload the models and approve it again")
        self.device = select_device(params.get("device", "auto"))
        self.pipeline = self._load(params)

    def _load(self, params: dict[str, Any]) -> MonaiPipeline:
        from monai.bundle import ConfigParser

        config_path = self.root / params.get("config", "configs/inference.json")
        weights_path = self.root / params.get("weights", "models/model.pt")
        if not weights_path.is_file():
            raise ModelLoadError(f"weights file {weights_path} is missing")
        parser = ConfigParser()
        try:
            meta_path = self.root / "configs" / "metadata.json"
            if meta_path.is_file():
                parser.read_meta(str(meta_path))
            parser.read_config(str(config_path))
        except Exception as exc:
            raise ModelLoadError(f"{config_path} cannot be read ({exc})") from exc
        parser["bundle_root"] = str(self.root)
        parser["device"] = self.device
        for key in ("dataloader", "dataloader_val"):
            node = _config_value(parser, key, None)
            if isinstance(node, dict) and "num_workers" in node:
                parser[f"{key}#num_workers"] = 0
        is_loader = _INPUT_LOADERS.__contains__
        _edit_transforms(parser, "preprocessing", is_loader)
        _edit_transforms(parser, "postprocessing", _is_file_writer)

        try:
            if weights_path.suffix == ".ts":
                network = torch.jit.load(str(weights_path), map_location=self.device)
            else:
                if _config_value(parser, "network_def", None) is None:
                    raise ModelLoadError(f"{config_path.name} has no network_def for {weights_path.name}")
                parser["network_def"] = _no_pretrained(parser.get("network_def"))
                network = parser.get_parsed_content("network_def", instantiate=True)
                network = load_weights(network, weights_path)
            network = network.to(self.device).eval()
            preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
            inferer = parser.get_parsed_content("inferer", instantiate=True)
            postprocessing = (parser.get_parsed_content("postprocessing", instantiate=True)
                              if _config_value(parser, "postprocessing", None) is not None else None)
        except ModelLoadError:
            raise
        except Exception as exc:  # anything a foreign config can raise while being instantiated
            detail = " ".join(str(exc).split())[:400]
            raise ModelLoadError(f"bundle {self.root.name} cannot be instantiated from {config_path.name}: "
                                 f"{type(exc).__name__}: {detail}") from exc
        _drop_instances(preprocessing, is_loader)
        _drop_instances(postprocessing, _is_file_writer)
        if params.get("sw_batch_size") is not None and hasattr(inferer, "sw_batch_size"):
            inferer.sw_batch_size = int(params["sw_batch_size"])
        if params.get("overlap") is not None and hasattr(inferer, "overlap"):
            inferer.overlap = params["overlap"]
        amp = params.get("amp")
        if amp is None:
            amp = _config_value(parser, "amp", None)
            if not isinstance(amp, bool):
                evaluator = _config_value(parser, "evaluator", {})
                amp = isinstance(evaluator, dict) and evaluator.get("amp") is True
        return MonaiPipeline(preprocessing=preprocessing, network=network, inferer=inferer,
                             postprocessing=postprocessing, device=self.device,
                             amp=bool(amp) and self.device.type == "cuda",
                             input_key=params.get("input_key", "image"), output_key=params.get("output_key", "pred"),
                             channels=len(params["inputs"]) if params.get("inputs") else None)

    def segment(self, volume: Volume, progress: ProgressCallback) -> SegmentationResult:
        """Label map (uint8, on the grid of ``volume``) for a single-channel bundle."""
        return self.pipeline.segment(self.info, [volume], progress)

    def segment_channels(self, volumes: Sequence[Volume], progress: ProgressCallback) -> SegmentationResult:
        """Label map on the grid of ``volumes[0]`` for a multi-channel bundle (one series per channel, in the
        order of the bundle's ``channel_def``); the other series are resampled onto the first one's grid."""
        return self.pipeline.segment(self.info, list(volumes), progress)


def bundle_metadata(folder: Path) -> dict:
    """The bundle's ``configs/metadata.json`` (for reports and tests)."""
    return json.loads((Path(folder) / "configs" / "metadata.json").read_text())


def check_model(manifest: ModelManifest) -> ModelManifest:
    """Load an available model once in this (worker) process, so that what only a load can find -- weights
    that do not match the network, a config that does not instantiate -- shows as "unavailable" with the
    reason instead of failing the first job. The loaded model stays in the registry's cache."""
    from inference.models.registry import load_model

    if not manifest.available:
        return manifest
    try:
        load_model(manifest)
    except ModelLoadError as exc:
        return unavailable(manifest, str(exc))
    except Exception as exc:  # an entry that cannot be imported or built
        return unavailable(manifest, f"cannot be loaded: {type(exc).__name__}: {exc}")
    return manifest
