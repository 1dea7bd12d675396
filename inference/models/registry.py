"""Worker side of the model registry: from a manifest to a loaded model (cached)."""

from __future__ import annotations

import importlib
import threading

from inference.models.base import Code, ModelInfo, SegmentationModel, SegmentDescription
from inference.models.manifest import ModelManifest

_cache: dict[tuple[str, str], SegmentationModel] = {}
_lock = threading.Lock()


def model_info(manifest: ModelManifest) -> ModelInfo:
    segments = tuple(
        SegmentDescription(label=s["label"], name=s["name"], category=Code(**s["category"]), type=Code(**s["type"]),
                           color=tuple(s["color"]), algorithm_type=s.get("algorithm_type", "AUTOMATIC"))
        for s in manifest.segments)
    return ModelInfo(id=manifest.id, name=manifest.name, version=manifest.version, task=manifest.task,
                     modality=manifest.modality, segments=segments, description=manifest.description,
                     trained_on=manifest.trained_on, accuracy=manifest.accuracy,
                     demonstration=manifest.demonstration)


def load_model(manifest: ModelManifest) -> SegmentationModel:
    """Import ``entry`` ("module:Class") and build it; a changed manifest (new checksum) is loaded anew."""
    if not getattr(manifest, "available", True):
        raise RuntimeError(f"model '{manifest.id}' is unavailable: {manifest.reason}")
    key = (manifest.id, manifest.sha256)
    with _lock:
        if key not in _cache:
            module_name, _, class_name = manifest.entry.partition(":")
            cls = getattr(importlib.import_module(module_name), class_name)
            _cache[key] = cls(model_info(manifest), dict(manifest.params))
        return _cache[key]
