"""Model manifests: what models are installed, read from ``*/manifest.json`` files. STDLIB ONLY.

The Orthanc plugin imports this module inside Orthanc's embedded Python (no numpy there) to list models
and route studies; the worker uses the same manifests to load the implementations.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

BUILTIN_MODELS_DIR = Path(__file__).resolve().parent / "builtin"

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "id": str, "name": str, "version": str, "task": str, "modality": str, "kind": str, "entry": str,
    "segments": list,
}
_OPTIONAL: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "params": (dict, {}), "description": (str, ""), "trained_on": (str, ""), "accuracy": (str, ""),
    "demonstration": (bool, False),
}


class ManifestError(Exception):
    """A manifest is missing, malformed or conflicts with another; the message names the file and key."""


@dataclass(frozen=True)
class ModelManifest:
    """One installed model as its ``manifest.json`` describes it; ``path`` is its folder."""

    id: str
    name: str
    version: str
    task: str
    modality: str
    kind: str
    entry: str
    segments: list[dict]
    params: dict = field(default_factory=dict)
    description: str = ""
    trained_on: str = ""
    accuracy: str = ""
    demonstration: bool = False
    path: str = ""
    sha256: str = ""

    def to_json(self) -> dict:
        """The model as ``GET /ai/models`` shows it."""
        return {"id": self.id, "name": self.name, "version": self.version, "task": self.task,
                "modality": self.modality, "kind": self.kind, "description": self.description,
                "trained_on": self.trained_on, "accuracy": self.accuracy, "demonstration": self.demonstration,
                "labels": [{"label": s.get("label"), "name": s.get("name")} for s in self.segments],
                "inputs": self.params.get("inputs", [{"modality": self.modality}]),
                "sha256": self.sha256, "path": self.path}


def _check_segments(segments: list, where: str) -> None:
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict):
            raise ManifestError(f"{where}: segments[{i}] must be an object")
        for key in ("label", "name", "category", "type", "color"):
            if key not in seg:
                raise ManifestError(f"{where}: segments[{i}] lacks '{key}'")
        if isinstance(seg["label"], bool) or not isinstance(seg["label"], int) or not 1 <= seg["label"] <= 255:
            raise ManifestError(f"{where}: segments[{i}].label must be an integer 1..255")
        for code_key in ("category", "type"):
            code = seg[code_key]
            if not (isinstance(code, dict) and all(isinstance(code.get(k), str) for k in ("value", "scheme", "meaning"))):
                raise ManifestError(f"{where}: segments[{i}].{code_key} needs string value, scheme and meaning")
        color = seg["color"]
        if not (isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise ManifestError(f"{where}: segments[{i}].color must be [r, g, b] integers 0..255")


def read_manifest(path: Path) -> ModelManifest:
    """Read and validate one ``manifest.json``; raises ManifestError naming the file and the key."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: must be a JSON object")
    values: dict[str, Any] = {}
    for key, kind in _REQUIRED.items():
        if key not in data:
            raise ManifestError(f"{path}: required key '{key}' is missing")
        if not isinstance(data[key], kind) or (kind is str and not data[key]):
            raise ManifestError(f"{path}: '{key}' must be a non-empty {getattr(kind, '__name__', kind)}")
        values[key] = data[key]
    for key, (kind, default) in _OPTIONAL.items():
        value = data.get(key, default)
        if not isinstance(value, kind):
            raise ManifestError(f"{path}: '{key}' must be a {getattr(kind, '__name__', kind)}")
        values[key] = value
    if ":" not in values["entry"]:
        raise ManifestError(f"{path}: 'entry' must be 'module:Class'")
    _check_segments(values["segments"], str(path))
    return ModelManifest(**values, path=str(path.parent), sha256=hashlib.sha256(raw).hexdigest())


def load_manifests(directories: Sequence[Path]) -> list[ModelManifest]:
    """Every ``<dir>/*/manifest.json`` of the given directories (missing directories are skipped)."""
    seen: dict[str, ModelManifest] = {}
    for directory in directories:
        directory = Path(directory)
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*/manifest.json")):
            manifest = read_manifest(path)
            if manifest.id in seen:
                first = Path(seen[manifest.id].path) / "manifest.json"
                raise ManifestError(f"model id '{manifest.id}' is defined twice: {first} and {path}")
            seen[manifest.id] = manifest
    return list(seen.values())
