"""Model manifests: what models are installed and whether they may run. STDLIB ONLY.

The Orthanc plugin imports this module inside Orthanc's embedded Python (no numpy there) to list models
and route studies; the worker uses the same manifests to load the implementations.

Three layouts are discovered in each models directory, one model per sub-folder:
- ``manifest.json`` (kind "builtin", or "torchscript" with its ``model.ts``);
- a MONAI bundle in the Model Zoo layout (``configs/metadata.json``, ``configs/inference.json``,
  ``models/model.pt`` or ``models/model.ts``), kind "monai_bundle". What the Zoo's metadata lacks
  (SNOMED-coded segments, colours, an id) may be given in an extra ``"orthanc_ai"`` object of metadata.json.

Bundles and TorchScript files carry code (configs evaluate Python expressions), so outside the trusted
(built-in) directories each one must be pinned by checksum in ``"AI": {"ApprovedModels": {id: sha256}}``;
an unpinned or changed one is listed with status "unavailable" and a reason that says what to do.
A broken bundle is listed the same way and never hides the others.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

BUILTIN_MODELS_DIR = Path(__file__).resolve().parent / "builtin"

BUNDLE_KIND = "monai_bundle"
TORCHSCRIPT_KIND = "torchscript"
BUNDLE_ENTRY = "inference.models.bundle:MonaiBundleModel"
TORCHSCRIPT_ENTRY = "inference.models.torchscript:TorchScriptModel"
AVAILABLE, UNAVAILABLE = "available", "unavailable"
# Kinds that execute code or opaque graphs from the model folder: they need an administrator's approval.
APPROVAL_REQUIRED_KINDS = frozenset({BUNDLE_KIND, TORCHSCRIPT_KIND})
# Folders of a bundle covered by its checksum: configs and weights, and the Python a config may import.
BUNDLE_CHECKSUM_FOLDERS = ("configs", "models", "scripts")

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "id": str, "name": str, "version": str, "task": str, "modality": str, "kind": str, "entry": str,
    "segments": list,
}
_OPTIONAL: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "params": (dict, {}), "description": (str, ""), "trained_on": (str, ""), "accuracy": (str, ""),
    "demonstration": (bool, False),
}
_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
_CHUNK = 1 << 20

# Segment codes for names that MONAI Zoo channel_def entries commonly use; anything else gets a local code
# (and the administrator can give proper codes in "orthanc_ai": {"segments": [...]}).
_SCT_CATEGORY_ANATOMY = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}
_SCT_CATEGORY_ABNORMAL = {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically abnormal structure"}
_KNOWN_SEGMENTS: dict[str, tuple[dict, dict]] = {
    "spleen": (_SCT_CATEGORY_ANATOMY, {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"}),
    "liver": (_SCT_CATEGORY_ANATOMY, {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}),
    "kidney": (_SCT_CATEGORY_ANATOMY, {"value": "64033007", "scheme": "SCT", "meaning": "Kidney"}),
    "lesion": (_SCT_CATEGORY_ABNORMAL, {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"}),
    "tumor": (_SCT_CATEGORY_ABNORMAL, {"value": "108369006", "scheme": "SCT", "meaning": "Neoplasm"}),
    "tumour": (_SCT_CATEGORY_ABNORMAL, {"value": "108369006", "scheme": "SCT", "meaning": "Neoplasm"}),
    "edema": (_SCT_CATEGORY_ABNORMAL, {"value": "79654002", "scheme": "SCT", "meaning": "Edema"}),
    "oedema": (_SCT_CATEGORY_ABNORMAL, {"value": "79654002", "scheme": "SCT", "meaning": "Edema"}),
}
_PALETTE = ([255, 64, 64], [64, 160, 255], [255, 200, 0], [64, 200, 100], [200, 80, 255], [255, 128, 0],
            [0, 200, 200], [160, 160, 160])
_BACKGROUND_NAMES = frozenset({"background", "bg", "_background_", "none"})


class ManifestError(Exception):
    """A manifest is missing, malformed or conflicts with another; the message names the file and key."""


class _Unavailable(Exception):
    """Internal: a model folder that is listed but cannot run; the message is the reason shown to users."""


@dataclass(frozen=True)
class ModelManifest:
    """One installed model as its folder describes it; ``path`` is its folder.

    ``sha256`` is the checksum an administrator pins: of ``manifest.json`` for built-in models, of the
    configs/models/scripts files for a MONAI bundle, of manifest.json + weights for TorchScript.
    """

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
    status: str = AVAILABLE
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.status == AVAILABLE

    def to_json(self) -> dict:
        """The model as ``GET /ai/models`` shows it."""
        return {"id": self.id, "name": self.name, "version": self.version, "task": self.task,
                "modality": self.modality, "kind": self.kind, "description": self.description,
                "trained_on": self.trained_on, "accuracy": self.accuracy, "demonstration": self.demonstration,
                "labels": [{"label": s.get("label"), "name": s.get("name")} for s in self.segments],
                "inputs": self.params.get("inputs", [{"modality": self.modality}]),
                "sha256": self.sha256, "path": self.path, "status": self.status, "reason": self.reason}


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
    labels = [seg["label"] for seg in segments]
    if len(set(labels)) != len(labels):
        raise ManifestError(f"{where}: segment labels must be distinct, got {labels}")


def read_manifest(path: Path) -> ModelManifest:
    """Read and validate one ``manifest.json``; raises ManifestError naming the file and the key."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: must be a JSON object")
    if data.get("kind") == TORCHSCRIPT_KIND:
        data.setdefault("entry", TORCHSCRIPT_ENTRY)
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


# --- checksums ----------------------------------------------------------------------------------


def files_checksum(root: Path, relative_paths: Sequence[str]) -> str:
    """SHA-256 over the sorted relative paths, sizes and bytes of files under ``root`` (streamed)."""
    digest = hashlib.sha256()
    for rel in sorted(relative_paths):
        path = root / rel
        digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def bundle_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the files a bundle checksum covers (compiled Python caches excluded)."""
    found = []
    for name in BUNDLE_CHECKSUM_FOLDERS:
        base = folder / name
        if not base.is_dir():
            continue
        for path in base.rglob("*"):
            rel = path.relative_to(folder)
            if "__pycache__" in rel.parts or path.suffix == ".pyc" or not path.is_file():
                continue
            found.append(rel.as_posix())
    return found


def bundle_checksum(folder: Path) -> str:
    """The checksum an administrator approves for a MONAI bundle folder."""
    return files_checksum(folder, bundle_files(folder))


# --- MONAI bundles ------------------------------------------------------------------------------


def is_bundle(folder: Path) -> bool:
    """True for a folder in the MONAI bundle layout (it has a ``configs`` folder with a metadata or config)."""
    configs = folder / "configs"
    return configs.is_dir() and any((configs / name).is_file() for name in (
        "metadata.json", "inference.json", "inference.yaml", "inference.yml"))


def model_id(text: str) -> str:
    """A model id from a folder or model name: lower case, [a-z0-9._-], other characters become '-'."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.strip().lower()).strip("-._")
    return slug or "model"


def _read_json_object(path: Path, what: str) -> dict:
    if not path.is_file():
        raise _Unavailable(f"{what} is missing ({path})")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise _Unavailable(f"{what} is not valid JSON ({path}: {exc})") from None
    if not isinstance(data, dict):
        raise _Unavailable(f"{what} must be a JSON object ({path})")
    return data


def _read_inference_config(folder: Path) -> tuple[str, dict]:
    """(relative path, content) of the bundle's inference config: JSON, or YAML when PyYAML is installed."""
    json_path = folder / "configs" / "inference.json"
    if json_path.is_file():
        return "configs/inference.json", _read_json_object(json_path, "configs/inference.json")
    for name in ("inference.yaml", "inference.yml"):
        path = folder / "configs" / name
        if path.is_file():
            try:
                import yaml  # optional: only when a bundle ships YAML configs
            except ImportError:
                raise _Unavailable(f"configs/{name} needs PyYAML, which is not installed here; "
                                   "install it or convert the config to configs/inference.json") from None
            try:
                data = yaml.safe_load(path.read_text())
            except Exception as exc:  # yaml raises many error types
                raise _Unavailable(f"configs/{name} is not valid YAML ({exc})") from None
            if not isinstance(data, dict):
                raise _Unavailable(f"configs/{name} must be a mapping")
            return f"configs/{name}", data
    raise _Unavailable("configs/inference.json is missing: the bundle has no inference configuration")


def _segments_from_channels(channel_def: Mapping[str, Any], fallback_name: str) -> list[dict]:
    """Segments from ``network_data_format.outputs.pred.channel_def``.

    With a background channel 0 (softmax/argmax bundles) the channel index is the label value; without one
    (sigmoid multi-label bundles) channel c is taken as label c + 1, which the bundle's own post-processing
    may contradict: such bundles should list their labels in ``orthanc_ai.segments``.
    """
    try:
        channels = sorted((int(k), str(v)) for k, v in channel_def.items())
    except (TypeError, ValueError):
        raise _Unavailable("network_data_format.outputs.pred.channel_def keys must be channel numbers") from None
    has_background = bool(channels) and channels[0][0] == 0 and channels[0][1].strip().lower() in _BACKGROUND_NAMES
    named = [(c if has_background else c + 1, name) for c, name in channels if not (has_background and c == 0)]
    if not named:
        named = [(1, fallback_name)]
    segments = []
    for index, (label, name) in enumerate(named):
        if not 1 <= label <= 255:
            raise _Unavailable(f"output channel {name!r} maps to label {label}, outside 1..255")
        category, code = _KNOWN_SEGMENTS.get(name.strip().lower(), (
            _SCT_CATEGORY_ANATOMY, {"value": model_id(name)[:16], "scheme": "99ORTHANCAI", "meaning": name[:64]}))
        segments.append({"label": label, "name": name, "category": dict(category), "type": dict(code),
                         "color": list(_PALETTE[index % len(_PALETTE)])})
    return segments


def _text(meta: Mapping[str, Any], key: str) -> str:
    value = meta.get(key, "")
    return value.strip() if isinstance(value, str) else ""


def _bundle_manifest(folder: Path, sha256: str) -> ModelManifest:
    """Describe a bundle folder; raises _Unavailable (with the best id known) when it cannot run."""
    meta = _read_json_object(folder / "configs" / "metadata.json", "configs/metadata.json")
    extra = meta.get("orthanc_ai", {})
    if not isinstance(extra, dict):
        raise _Unavailable('"orthanc_ai" in configs/metadata.json must be an object')
    config_rel, config = _read_inference_config(folder)

    data_format = meta.get("network_data_format", {})
    data_format = data_format if isinstance(data_format, dict) else {}
    inputs = data_format.get("inputs") if isinstance(data_format.get("inputs"), dict) else {}
    outputs = data_format.get("outputs") if isinstance(data_format.get("outputs"), dict) else {}
    input_key = "image" if "image" in inputs else next(iter(inputs), "image")
    output_key = "pred" if "pred" in outputs else next(iter(outputs), "pred")
    image = inputs.get(input_key) if isinstance(inputs.get(input_key), dict) else {}
    pred = outputs.get(output_key) if isinstance(outputs.get(output_key), dict) else {}

    output_format = str(pred.get("format", "segmentation")).lower()
    if output_format != "segmentation" and "segments" not in extra:
        raise _Unavailable(f"the bundle's output '{output_key}' is a {output_format!r}, not a segmentation; "
                           "only segmentation bundles run here")
    modality = extra.get("modality") or image.get("modality") or ""
    if not isinstance(modality, str) or not modality:
        raise _Unavailable('configs/metadata.json does not name the input modality; add '
                           '"orthanc_ai": {"modality": "CT"} (or MR, ...) to it')
    channel_names = image.get("channel_def") if isinstance(image.get("channel_def"), dict) else {}
    try:
        channel_count = int(image.get("num_channels", max(len(channel_names), 1)))
    except (TypeError, ValueError):
        raise _Unavailable("network_data_format.inputs num_channels must be an integer") from None
    model_inputs = [{"modality": modality, "channel": c, "name": str(channel_names.get(str(c), f"channel {c}"))}
                    for c in range(channel_count)]

    task_text = _text(meta, "task")
    if "segments" in extra:
        segments = extra["segments"]
        if not isinstance(segments, list) or not segments:
            raise _Unavailable('"orthanc_ai.segments" must be a non-empty list')
        try:
            _check_segments(segments, "orthanc_ai")
        except ManifestError as exc:
            raise _Unavailable(f"configs/metadata.json {exc}") from None
    else:
        channel_def = pred.get("channel_def") if isinstance(pred.get("channel_def"), dict) else {}
        segments = _segments_from_channels(channel_def, task_text or folder.name)

    if "network_def" in config and (folder / "models" / "model.pt").is_file():
        weights = "models/model.pt"
    elif (folder / "models" / "model.ts").is_file():
        weights = "models/model.ts"
    elif "network_def" in config:
        raise _Unavailable("weights are missing: models/model.pt (or models/model.ts) is not in the bundle; "
                           "copy the file the bundle's authors publish (see its large_files.yml)")
    else:
        raise _Unavailable(f"{config_rel} has no 'network_def' and models/model.ts is missing")
    if (folder / weights).stat().st_size == 0:
        raise _Unavailable(f"{weights} is empty")
    for key in ("preprocessing", "inferer"):
        if key not in config:
            raise _Unavailable(f"{config_rel} has no '{key}' section")

    params: dict[str, Any] = {"bundle": str(folder), "config": config_rel, "weights": weights, "sha256": sha256,
                              "device": "auto", "input_key": input_key, "output_key": output_key,
                              "inputs": model_inputs}
    if "spacing" in extra:
        params["spacing"] = extra["spacing"]
    extra_params = extra.get("params", {})
    if not isinstance(extra_params, dict):
        raise _Unavailable('"orthanc_ai.params" must be an object')
    params.update(extra_params)

    description = extra.get("description") or " ".join(
        t for t in (task_text + ("." if task_text and not task_text.endswith(".") else ""),
                    _text(meta, "description")) if t)
    intended_use = _text(meta, "intended_use").lower()
    accuracy = extra.get("accuracy")
    if accuracy is None:
        metrics = meta.get("eval_metrics") if isinstance(meta.get("eval_metrics"), dict) else {}
        accuracy = ", ".join(f"{k} {v}" for k, v in metrics.items())
        accuracy = f"{accuracy} (reported by the bundle's authors, not measured here)" if accuracy else ""
    values = {
        "name": extra.get("name") or _text(meta, "name") or folder.name,
        "version": extra.get("version") or _text(meta, "version") or "0",
        "task": extra.get("task") or "segmentation",
        "description": description,
        "trained_on": extra.get("trained_on") or _text(meta, "data_source"),
        "accuracy": accuracy,
        "demonstration": extra.get("demonstration",
                                   "not" in intended_use and "diagnos" in intended_use),
    }
    for key, value in values.items():
        if not isinstance(value, bool if key == "demonstration" else str):
            raise _Unavailable(f'"orthanc_ai.{key}" has the wrong type')
    return ModelManifest(id=_bundle_id(folder, meta), modality=modality, kind=BUNDLE_KIND, entry=BUNDLE_ENTRY,
                         segments=segments, params=params, path=str(folder), sha256=sha256, **values)


def _bundle_id(folder: Path, meta: Mapping[str, Any] | None) -> str:
    extra = meta.get("orthanc_ai") if isinstance(meta, Mapping) else None
    if isinstance(extra, dict) and isinstance(extra.get("id"), str) and extra["id"]:
        return model_id(extra["id"])
    return model_id(folder.name)


def unavailable(manifest: ModelManifest, reason: str) -> ModelManifest:
    """A copy marked "unavailable"; the reason also goes into ``params`` so that a forced load refuses it."""
    return replace(manifest, status=UNAVAILABLE, reason=reason,
                   params={**manifest.params, "unavailable_reason": reason})


def _unavailable(folder: Path, kind: str, entry: str, reason: str, sha256: str = "",
                 model: str | None = None) -> ModelManifest:
    manifest = ModelManifest(id=model or model_id(folder.name), name=folder.name, version="", task="segmentation",
                             modality="", kind=kind, entry=entry, segments=[], path=str(folder), sha256=sha256,
                             params={"bundle": str(folder)})
    return unavailable(manifest, reason)


def read_bundle(folder: Path) -> ModelManifest:
    """Describe a MONAI bundle folder; never raises: a bundle that cannot run comes back "unavailable"."""
    folder = Path(folder)
    try:
        sha256 = bundle_checksum(folder)
    except OSError as exc:
        return _unavailable(folder, BUNDLE_KIND, BUNDLE_ENTRY, f"bundle files cannot be read ({exc})")
    try:
        return _bundle_manifest(folder, sha256)
    except _Unavailable as exc:
        try:
            meta = json.loads((folder / "configs" / "metadata.json").read_bytes())
        except (ValueError, OSError):
            meta = None
        return _unavailable(folder, BUNDLE_KIND, BUNDLE_ENTRY, str(exc), sha256, _bundle_id(folder, meta))


# --- TorchScript models -------------------------------------------------------------------------


def _torchscript_checked(manifest: ModelManifest) -> ModelManifest:
    """Checksum manifest.json + weights; a missing weights file makes the model "unavailable"."""
    folder = Path(manifest.path)
    weights = manifest.params.get("model", "model.ts")
    if not isinstance(weights, str) or Path(weights).is_absolute() or ".." in Path(weights).parts:
        return unavailable(manifest, f"params.model must be a file name inside {folder}, not {weights!r}")
    if not (folder / weights).is_file():
        return unavailable(manifest, f"the TorchScript file {weights} is missing in {folder}")
    try:
        sha256 = files_checksum(folder, sorted({"manifest.json", Path(weights).as_posix()}))
    except OSError as exc:
        return unavailable(manifest, f"model files cannot be read ({exc})")
    params = {**manifest.params, "model": weights, "sha256": sha256, "folder": str(folder)}
    return replace(manifest, sha256=sha256, params=params)


# --- approval and discovery ---------------------------------------------------------------------


def _is_under(folder: Path, roots: Sequence[Path]) -> bool:
    resolved = folder.resolve()
    for root in roots:
        root = Path(root).resolve()
        if resolved == root or root in resolved.parents:
            return True
    return False


def approval_snippet(manifest: ModelManifest) -> str:
    """The orthanc.json fragment that approves this exact version of a model."""
    return json.dumps({"AI": {"ApprovedModels": {manifest.id: manifest.sha256}}})


def _approved(manifest: ModelManifest, approved: Mapping[str, str]) -> ModelManifest:
    """The manifest, or an "unavailable" copy saying what the administrator must add or check."""
    pinned = approved.get(manifest.id)
    if pinned is None:
        reason = (f"not approved: {manifest.kind} models run code from their folder ({manifest.path}), so an "
                  f"administrator must pin each one by checksum. After reviewing it, add "
                  f"{approval_snippet(manifest)} to orthanc.json and reload the models.")
    elif pinned.lower() != manifest.sha256:
        reason = (f"checksum changed: the files in {manifest.path} now have sha256 {manifest.sha256}, but "
                  f"\"AI.ApprovedModels.{manifest.id}\" approves {pinned}. Check what changed, then set "
                  f"{approval_snippet(manifest)} in orthanc.json and reload the models.")
    else:
        return manifest
    return unavailable(manifest, reason)


def read_model_folder(folder: Path) -> ModelManifest | None:
    """The model in one folder (bundle or manifest.json), or None if the folder holds neither.

    Raises ManifestError for a malformed ``manifest.json`` (as before); bundles never raise.
    """
    if is_bundle(folder):
        return read_bundle(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = read_manifest(manifest_path)
    if manifest.kind == TORCHSCRIPT_KIND:
        manifest = _torchscript_checked(manifest)
    return manifest


def load_manifests(directories: Sequence[Path], *, approved: Mapping[str, str] | None = None,
                   trusted: Sequence[Path] = (BUILTIN_MODELS_DIR,)) -> list[ModelManifest]:
    """Every model folder of the given directories (missing directories are skipped), unavailable ones included.

    Models under a ``trusted`` directory always run; other MONAI bundles and TorchScript models run only
    when ``approved`` maps their id to their current checksum. Duplicate ids raise ManifestError.
    """
    approved = approved or {}
    seen: dict[str, ModelManifest] = {}
    for directory in directories:
        directory = Path(directory)
        if not directory.is_dir():
            continue
        for folder in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            manifest = read_model_folder(folder)
            if manifest is None:
                continue
            if (manifest.available and manifest.kind in APPROVAL_REQUIRED_KINDS
                    and not _is_under(folder, trusted)):
                manifest = _approved(manifest, approved)
            if manifest.id in seen:
                raise ManifestError(f"model id '{manifest.id}' is defined twice: {_where(seen[manifest.id])} "
                                    f"and {_where(manifest)}")
            seen[manifest.id] = manifest
    return list(seen.values())


def _where(manifest: ModelManifest) -> str:
    path = Path(manifest.path)
    return str(path / "manifest.json") if (path / "manifest.json").is_file() and not is_bundle(path) else str(path)
