"""The ``"AI"`` section of orthanc.json: parsed and validated once at start-up.

A bad value stops start-up with a message that names the key (``ConfigError``). Environment variables
override secrets and ports only (handled by the launcher), never behaviour.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orthanc_plugin.rules import Rule, RuleError, parse_rules

if TYPE_CHECKING:
    from orthanc_plugin.priors import PriorsSettings

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_RULES: list[dict] = [
    {"Name": "brain MR to lesion candidates", "Modality": "MR", "Model": "brain-lesion-candidates"},
]


@dataclass(frozen=True)
class Destination:
    """Where results are forwarded: one of Orthanc's own DICOM modalities, Orthanc peers or DICOMweb servers."""

    name: str
    type: str    # dicom | peer | dicomweb
    target: str  # the key in DicomModalities / OrthancPeers / DicomWeb.Servers

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.type, "target": self.target}


DESTINATION_SOURCES = {"dicom": "DicomModalities", "peer": "OrthancPeers", "dicomweb": "DicomWeb.Servers"}


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the key."""


@dataclass(frozen=True)
class AIConfig:
    enabled: bool = True
    data_directory: Path = REPO_ROOT / "var"
    models_directories: tuple[Path, ...] = ()
    rules: tuple[Rule, ...] = ()
    worker_count: int = 1
    worker_python: Path = REPO_ROOT / ".venv" / "bin" / "python"
    worker_threads: int = 2
    lease_seconds: float = 30.0
    max_attempts: int = 3
    reaper_interval_seconds: float = 2.0
    auto_trigger: bool = True
    annotation_metadata: bool = True
    report_language: str = "en"
    report_template_directory: Path | None = None
    approved_models: dict[str, str] = field(default_factory=dict)
    destinations: dict[str, "Destination"] = field(default_factory=dict)
    outbox_max_age_seconds: float = 86400.0
    outbox_initial_backoff_seconds: float = 5.0
    outbox_max_backoff_seconds: float = 600.0
    min_free_disk_percent: float = 5.0
    max_queue_length: int = 1000
    off_peak_hours: str | None = None
    worker_restart_max_backoff_seconds: float = 30.0
    priors: "PriorsSettings | None" = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def job_store_path(self) -> Path:
        return self.data_directory / "ai-jobs.sqlite"

    @property
    def log_directory(self) -> Path:
        return self.data_directory / "logs"


_KNOWN = {"Enabled", "DataDirectory", "ModelsDirectory", "ModelsDirectories", "Rules", "WorkerCount",
          "WorkerPython", "WorkerThreads", "LeaseSeconds", "MaxAttempts", "ReaperIntervalSeconds",
          "AutoTrigger", "Report", "ApprovedModels", "Destinations", "Outbox",
          "MinFreeDiskPercent", "MaxQueueLength", "OffPeakHours", "WorkerRestartMaxBackoffSeconds",
          "Priors", "Pathology", "AnnotationMetadata"}  # Pathology is validated by orthanc_plugin/slides.py
REPORT_LANGUAGES = ("en", "fr")


def _typed(section: dict, key: str, kind: type | tuple, default: Any) -> Any:
    if key not in section:
        return default
    value = section[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(f'"AI.{key}" must be a number, not {value!r}')
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "number"
        raise ConfigError(f'"AI.{key}" must be a {name}, not {value!r}')
    return value


def _path(value: str, base: Path) -> Path:
    expanded = os.path.expandvars(os.path.expanduser(value))
    p = Path(expanded)
    return p if p.is_absolute() else (base / p).resolve()


def parse_config(full: dict, *, base: Path = REPO_ROOT) -> AIConfig:
    """Validate the ``"AI"`` section of a parsed Orthanc configuration."""
    section = full.get("AI", {})
    if not isinstance(section, dict):
        raise ConfigError('"AI" must be a JSON object')
    unknown = sorted(set(section) - _KNOWN)
    if unknown:
        raise ConfigError(f'unknown key(s) in "AI": {", ".join(unknown)} (known: {", ".join(sorted(_KNOWN))})')

    data_dir = _path(_typed(section, "DataDirectory", str, str(base / "var")), base)
    dirs: list[Path] = []
    if "ModelsDirectory" in section:
        dirs.append(_path(_typed(section, "ModelsDirectory", str, ""), base))
    for i, d in enumerate(_typed(section, "ModelsDirectories", list, [])):
        if not isinstance(d, str):
            raise ConfigError(f'"AI.ModelsDirectories[{i}]" must be a path string')
        dirs.append(_path(d, base))
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f'"AI.ModelsDirectory": {d} is not a directory')

    destinations = _destinations(full, _typed(section, "Destinations", dict, {}))
    outbox = _typed(section, "Outbox", dict, {})
    unknown = sorted(set(outbox) - {"MaxAgeSeconds", "InitialBackoffSeconds", "MaxBackoffSeconds"})
    if unknown:
        raise ConfigError(f'unknown key(s) in "AI.Outbox": {", ".join(unknown)}')
    outbox_values = {}
    for key, default in (("MaxAgeSeconds", 86400), ("InitialBackoffSeconds", 5), ("MaxBackoffSeconds", 600)):
        value = outbox.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f'"AI.Outbox.{key}" must be a positive number of seconds')
        outbox_values[key] = float(value)
    try:
        rules = parse_rules(_typed(section, "Rules", list, DEFAULT_RULES), destinations=destinations)
    except RuleError as exc:
        raise ConfigError(f'"AI.Rules": {exc}') from None

    worker_count = _typed(section, "WorkerCount", int, 1)
    if not 0 <= worker_count <= 16:
        raise ConfigError('"AI.WorkerCount" must be between 0 (external workers only) and 16')
    lease = float(_typed(section, "LeaseSeconds", (int, float), 30))
    if lease < 3:
        raise ConfigError('"AI.LeaseSeconds" must be at least 3 seconds')
    attempts = _typed(section, "MaxAttempts", int, 3)
    if attempts < 1:
        raise ConfigError('"AI.MaxAttempts" must be at least 1')
    threads = _typed(section, "WorkerThreads", int, 2)
    if threads < 1:
        raise ConfigError('"AI.WorkerThreads" must be at least 1')
    reaper = float(_typed(section, "ReaperIntervalSeconds", (int, float), 2))
    if reaper <= 0:
        raise ConfigError('"AI.ReaperIntervalSeconds" must be positive')
    python = _path(_typed(section, "WorkerPython", str, str(base / ".venv" / "bin" / "python")), base)
    if worker_count > 0 and not python.exists():
        raise ConfigError(f'"AI.WorkerPython": {python} does not exist (run "make venv" or set the key)')

    report = _typed(section, "Report", dict, {})
    unknown = sorted(set(report) - {"Language", "TemplateDirectory"})
    if unknown:
        raise ConfigError(f'unknown key(s) in "AI.Report": {", ".join(unknown)}')
    language = report.get("Language", "en")
    if language not in REPORT_LANGUAGES:
        raise ConfigError(f'"AI.Report.Language" must be one of {", ".join(REPORT_LANGUAGES)}, not {language!r}')
    template_dir = None
    if report.get("TemplateDirectory"):
        if not isinstance(report["TemplateDirectory"], str):
            raise ConfigError('"AI.Report.TemplateDirectory" must be a path string')
        template_dir = _path(report["TemplateDirectory"], base)
        if not template_dir.is_dir():
            raise ConfigError(f'"AI.Report.TemplateDirectory": {template_dir} is not a directory')
    approved = _typed(section, "ApprovedModels", dict, {})
    for model_id, checksum in approved.items():
        if not (isinstance(checksum, str) and re.fullmatch(r"[0-9a-f]{64}", checksum)):
            raise ConfigError(f'"AI.ApprovedModels.{model_id}" must be the model\'s sha256 (64 hex digits)')

    min_free = float(_typed(section, "MinFreeDiskPercent", (int, float), 5))
    if not 0 <= min_free < 100:
        raise ConfigError('"AI.MinFreeDiskPercent" must be between 0 and 100')
    max_queue = _typed(section, "MaxQueueLength", int, 1000)
    if max_queue < 1:
        raise ConfigError('"AI.MaxQueueLength" must be at least 1')
    off_peak = _typed(section, "OffPeakHours", str, None)
    if off_peak is not None:
        from orthanc_plugin.backpressure import parse_hours
        try:
            parse_hours(off_peak)
        except ValueError as exc:
            raise ConfigError(f'"AI.OffPeakHours": {exc}') from None

    restart_backoff = float(_typed(section, "WorkerRestartMaxBackoffSeconds", (int, float), 30))
    if restart_backoff < 1:
        raise ConfigError('"AI.WorkerRestartMaxBackoffSeconds" must be at least 1')

    priors_raw = _typed(section, "Priors", dict, {})
    unknown = sorted(set(priors_raw) - {"Source", "Auto", "MaxStudies", "CooldownHours"})
    if unknown:
        raise ConfigError(f'unknown key(s) in "AI.Priors": {", ".join(unknown)}')
    source = priors_raw.get("Source")
    if source is not None and source not in (full.get("DicomModalities") or {}):
        raise ConfigError(f'"AI.Priors.Source" "{source}" is not declared in Orthanc\'s DicomModalities')
    auto = priors_raw.get("Auto", False)
    max_studies = priors_raw.get("MaxStudies", 10)
    cooldown = priors_raw.get("CooldownHours", 24)
    if not isinstance(auto, bool):
        raise ConfigError('"AI.Priors.Auto" must be true or false')
    if isinstance(max_studies, bool) or not isinstance(max_studies, int) or max_studies < 1:
        raise ConfigError('"AI.Priors.MaxStudies" must be a positive integer')
    if isinstance(cooldown, bool) or not isinstance(cooldown, (int, float)) or cooldown < 0:
        raise ConfigError('"AI.Priors.CooldownHours" must be a number ≥ 0')
    from orthanc_plugin.priors import PriorsSettings
    priors = PriorsSettings(source, auto, max_studies, float(cooldown))

    return AIConfig(
        priors=priors,
        worker_restart_max_backoff_seconds=restart_backoff,
        min_free_disk_percent=min_free, max_queue_length=max_queue, off_peak_hours=off_peak,
        destinations=destinations, outbox_max_age_seconds=outbox_values["MaxAgeSeconds"],
        outbox_initial_backoff_seconds=outbox_values["InitialBackoffSeconds"],
        outbox_max_backoff_seconds=outbox_values["MaxBackoffSeconds"],
        report_language=language, report_template_directory=template_dir, approved_models=dict(approved),
        enabled=_typed(section, "Enabled", bool, True), data_directory=data_dir,
        models_directories=tuple(dirs), rules=tuple(rules), worker_count=worker_count,
        worker_python=python, worker_threads=threads, lease_seconds=lease, max_attempts=attempts,
        reaper_interval_seconds=reaper, auto_trigger=_typed(section, "AutoTrigger", bool, True),
        annotation_metadata=_typed(section, "AnnotationMetadata", bool, True),
    )


def _destinations(full: dict, raw: dict) -> dict[str, Destination]:
    """``"Destinations": {"main-pacs": {"Type": "dicom", "Target": "pacs"}}``; the target must be declared
    in Orthanc's own configuration (DicomModalities, OrthancPeers or DicomWeb.Servers)."""
    out = {}
    for name, item in raw.items():
        where = f'"AI.Destinations.{name}"'
        if not isinstance(item, dict) or set(item) - {"Type", "Target"}:
            raise ConfigError(f'{where} must be an object with "Type" and "Target"')
        kind, target = item.get("Type"), item.get("Target", name)
        if kind not in DESTINATION_SOURCES:
            raise ConfigError(f'{where}.Type must be one of {", ".join(DESTINATION_SOURCES)}')
        if kind == "dicomweb":
            declared = (full.get("DicomWeb") or {}).get("Servers") or {}
        else:
            declared = full.get(DESTINATION_SOURCES[kind]) or {}
        if target not in declared:
            raise ConfigError(f'{where}.Target "{target}" is not declared in Orthanc\'s {DESTINATION_SOURCES[kind]}')
        out[name] = Destination(name, kind, target)
    return out


def orthanc_url(full: dict) -> str:
    """Where the local worker reaches this Orthanc's REST API (always loopback)."""
    port = full.get("HttpPort", 8042)
    if not isinstance(port, int):
        raise ConfigError(f'"HttpPort" must be an integer, not {port!r}')
    return f"http://127.0.0.1:{port}"


def service_credentials(full: dict) -> tuple[str, str] | None:
    """Credentials the worker uses: $ORTHANC_AI_USER/$ORTHANC_AI_PASSWORD, else the first registered user."""
    user, password = os.environ.get("ORTHANC_AI_USER"), os.environ.get("ORTHANC_AI_PASSWORD")
    if user and password:
        return user, password
    users = full.get("RegisteredUsers") or {}
    if users:
        name = sorted(users)[0]
        return name, users[name]
    return None


_COMMENT = re.compile(r'("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/', re.S)


def strip_json_comments(text: str) -> str:
    """Orthanc accepts // and /* */ comments in its JSON configuration; json.loads does not."""
    return _COMMENT.sub(lambda m: m.group(1) or "", text)
