"""The slide report (JSON) and its JSON Schema (``report.schema.json``, next to this module).

Structure: version, slide_id, timestamp, status, error, source (with sha256), metadata, processing (tile
counts and timings), quality_control, results (nuclei by type, densities, regions of interest), outputs,
audit (software, reader, model id/version/parameters, a hash of every parameter, stage timings).
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["REPORT_VERSION", "SCHEMA_PATH", "build_report", "parameters_hash", "validate_report"]

REPORT_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


def parameters_hash(parameters: dict) -> str:
    """SHA-256 of the canonical JSON of every parameter: two runs with the same hash used the same settings."""
    return hashlib.sha256(json.dumps(parameters, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("numpy", "opencv-python-headless", "tiffslide", "openslide-python", "openslide-bin", "wsidicom",
                 "scikit-image", "scipy", "highdicom", "torch", "monai"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def build_report(*, slide_id: str, status: str, error: str | None, source: dict, qc_state: dict,
                 analysis: dict | None, outputs: dict, parameters: dict, worker: str,
                 timestamp: datetime | None = None) -> dict:
    """Assemble the report from the QC stage's state and the analysis stage's figures (JSON parts)."""
    from inference import __version__

    timings = dict(qc_state.get("timings") or {})
    if analysis:
        timings.update(analysis.get("timings") or {})
    qc = qc_state.get("quality_control")
    warnings = list((qc or {}).get("warnings", []))
    if analysis:
        warnings += [w for w in analysis.get("warnings", []) if w not in warnings]
    if qc is not None:
        qc = {**qc, "warnings": warnings}
    processing = {"tiles": {**(qc_state.get("tile_grid") or {}), **(qc_state.get("tile_counts") or {})} or None,
                  "nuclei_tiles": (analysis or {}).get("nuclei_tiles"),
                  "timings_s": timings, "worker": worker, "reader": (qc_state.get("metadata") or {}).get("reader")}
    results = None
    if analysis:
        results = {"nuclei": analysis["figures"]}
    return {
        "version": REPORT_VERSION,
        "slide_id": slide_id,
        "timestamp": (timestamp or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        "status": status,
        "error": error,
        "source": source,
        "metadata": qc_state.get("metadata"),
        "processing": processing,
        "quality_control": qc,
        "results": results,
        "outputs": outputs,
        "audit": {
            "software": {"name": "orthanc-ai", "version": __version__},
            "model": (analysis or {}).get("detector"),
            "parameters": parameters,
            "parameters_sha256": parameters_hash(parameters),
            "libraries": _library_versions(),
            "stages": [{"stage": k, "seconds": v} for k, v in timings.items()],
        },
    }


def validate_report(report: dict) -> None:
    """Raise ``jsonschema.ValidationError`` when the report does not follow the schema."""
    import jsonschema

    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
