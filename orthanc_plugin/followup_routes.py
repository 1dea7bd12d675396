"""REST routes of the longitudinal follow-up (under ``/ai/``), for the viewer's follow-up panel and the worker.

| route | what |
|---|---|
| ``GET /ai/patients?query=&limit=&offset=`` | patients with measurements; ``query`` matches Patient ID or name |
| ``GET /ai/patients/{PatientID}/lesions`` | time points with their lesions (new, persisting, disappeared) |
| ``GET /ai/patients/{PatientID}/lesions.csv`` | the same, one row per lesion per time point |
| ``GET /ai/patients/{PatientID}/report`` | per time point: counts, sum of longest diameters, response |
| ``GET /ai/studies/{StudyInstanceUID}/comparison`` | comparison with the previous study, from the stored SRs |
| ``POST /ai/studies/{StudyInstanceUID}/comparison`` | the same for findings not yet stored (the worker, before it writes its PDF) |
| ``GET /ai/followup/skipped`` | SRs that were not ingested, and why |

Every response category is computed, to be confirmed by the physician, and says so.
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import unquote

from orthanc_plugin.events import RequestError
from orthanc_plugin.followup import FollowUp, lesions_csv
from orthanc_plugin.routes import RawBody, Request

_UID = r"[0-9.]{1,64}"
_PATIENT = r"([^/]{1,256})"

Response = tuple[int, Any]


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(request.query.get(name, default))
    except (TypeError, ValueError):
        raise RequestError(f'"{name}" must be an integer') from None
    if not low <= value <= high:
        raise RequestError(f'"{name}" must be between {low} and {high}')
    return value


def _patient_id(raw: str) -> str:
    return unquote(raw)  # Orthanc hands the path over decoded; a client may have encoded twice


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f'{where} must be a number')
    return float(value)


def _point(value: Any, where: str) -> list[float] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 3):
        raise RequestError(f"{where} must be [x, y, z] in patient millimetres")
    return [_number(v, where) for v in value]  # type: ignore[misc]


def _findings_body(request: Request) -> dict:
    """The worker's findings, checked: numbers are numbers, points have three coordinates."""
    body = request.json()
    findings = body.get("findings")
    if not isinstance(findings, list):
        raise RequestError('"findings" (a list, possibly empty) is required')
    for key in ("patient_id", "study_date", "study_time", "frame_of_reference_uid"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise RequestError(f'"{key}" must be a string')
    if not body.get("patient_id"):
        raise RequestError('"patient_id" is required (the study\'s Patient ID)')
    _point(body.get("volume_centre_mm"), '"volume_centre_mm"')
    for i, finding in enumerate(findings):
        if not isinstance(finding, dict):
            raise RequestError(f"findings[{i}] must be an object")
        for key in ("volume_ml", "longest_diameter_mm", "short_axis_mm", "max_3d_diameter_mm"):
            _number(finding.get(key), f"findings[{i}].{key}")
        _point(finding.get("centroid_mm"), f"findings[{i}].centroid_mm")
    return body


def routes(service: FollowUp) -> list[tuple[str, str, Callable[..., Response]]]:
    """The follow-up's routes for :meth:`orthanc_plugin.routes.Api.add_routes`."""

    def list_patients(request: Request) -> Response:
        limit = _int(request, "limit", 50, 1, 1000)
        offset = _int(request, "offset", 0, 0, 10**9)
        total, patients = service.store.patients(request.query.get("query", "").strip(), limit=limit, offset=offset)
        return 200, {"patients": patients, "total": total, "limit": limit, "offset": offset}

    def lesions(request: Request, patient_id: str) -> Response:
        view = service.lesions(_patient_id(patient_id))
        if view is None:
            raise RequestError(f"no measurements for patient '{_patient_id(patient_id)}'", status=404)
        return 200, view

    def lesions_as_csv(request: Request, patient_id: str) -> Response:
        view = service.lesions(_patient_id(patient_id))
        if view is None:
            raise RequestError(f"no measurements for patient '{_patient_id(patient_id)}'", status=404)
        return 200, RawBody(lesions_csv(view), "text/csv; charset=utf-8")

    def report(request: Request, patient_id: str) -> Response:
        out = service.report(_patient_id(patient_id))
        if out is None:
            raise RequestError(f"no measurements for patient '{_patient_id(patient_id)}'", status=404)
        return 200, out

    def stored_comparison(request: Request, study_uid: str) -> Response:
        out = service.comparison(study_uid)
        if out is None:
            raise RequestError(f"no measurements for study {study_uid} yet", status=404)
        return 200, out

    def findings_comparison(request: Request, study_uid: str) -> Response:
        out = service.comparison(study_uid, _findings_body(request))
        assert out is not None  # the findings make the study a time point
        return 200, out

    def skipped(request: Request) -> Response:
        return 200, {"skipped": service.store.skipped(_int(request, "limit", 100, 1, 1000))}

    return [
        ("GET", r"patients", list_patients),
        ("GET", rf"patients/{_PATIENT}/lesions", lesions),
        ("GET", rf"patients/{_PATIENT}/lesions\.csv", lesions_as_csv),
        ("GET", rf"patients/{_PATIENT}/report", report),
        ("GET", rf"studies/({_UID})/comparison", stored_comparison),
        ("POST", rf"studies/({_UID})/comparison", findings_comparison),
        ("GET", r"followup/skipped", skipped),
    ]


__all__ = ["routes"]
