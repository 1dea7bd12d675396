"""Whole-slide pathology inside the plugin: the slide store, its state machine, REST routes and intake.

Runs in Orthanc's embedded Python: stdlib and sqlite-utils only (every pixel is read by the worker, in
``inference/pathology``). Slides come from three places:

- ``POST /ai/slides`` with the file as the body (``Content-Type: application/octet-stream``, file name in
  ``Content-Disposition``, options as headers ``X-Slide-Mpp``, ``X-Patient-ID``, ``X-Patient-Name``,
  ``X-Accession-Number``, ``X-Study-Instance-UID``, ``X-Study-Description``) or as a ``multipart/mixed`` body
  with a part named ``file`` (and parts ``mpp``, ``patient_id``… ) → **202** with the slide. A
  ``multipart/form-data`` upload (HTML form, ``curl -F``) works too, but Orthanc answers it itself with an
  empty 200 (see :meth:`Slides._form_part`). A JSON body ``{"series_instance_uid": …}`` queues a DICOM WSI
  series already in Orthanc;
- the inbox folder (``AI.Pathology.InboxDirectory``, default ``<data>/slides-inbox``): a file whose size
  has not changed for two scans is moved into the store;
- DICOM WSI series stored in Orthanc (SOP class VL Whole Slide Microscopy Image Storage): on
  ``STABLE_SERIES``, one slide per series (our own outputs excluded; a series already seen is not re-queued).

States, all transitions in :data:`TRANSITIONS` and audited: ``pending → qc → queued → running → done |
failed | skipped``. A worker claims a ``pending`` slide for its QC stage (``qc``) and a ``queued`` one for its
nuclei stage (``running``), each with a lease renewed by heartbeats; an expired lease sends the slide back
(``qc → pending``, ``running → queued``) until ``max_attempts``. Files live under ``<data>/slides/<id>/``.

A vendor file can also be converted to a DICOM WSI series (``POST /ai/slides/{id}/dicom``, or every one after
its analysis with ``AI.Pathology.ConvertToDicom``). The conversion is its own small job beside the slide's
state: ``dicom_state`` goes ``requested → converting → done | failed`` (audited as ``dicom`` events), a
worker claims it like a stage (with its own lease) and runs ``OrthancWSIDicomizer`` in its process, and the
series joins the study of the slide's results. It never changes the slide's state or results.

| route | what |
|---|---|
| ``POST /ai/slides`` | upload (body or multipart ``file``) or queue an Orthanc series (JSON) → 202 |
| ``GET /ai/slides?state=&limit=&offset=`` | slides, newest first, with counts per state |
| ``GET /ai/slides/{id}`` | id, status, progress, stage, message, error, metadata, qc, results summary |
| ``GET /ai/slides/{id}/thumbnail``, ``/tissue-mask``, ``/heatmap`` | PNG (the thumbnail's size) |
| ``GET /ai/slides/{id}/report`` | the report (JSON; see ``inference/pathology/report.schema.json``) |
| ``GET /ai/slides/{id}/nuclei.geojson.gz`` | nuclei for QuPath (gzip GeoJSON) |
| ``GET /ai/slides/{id}/audit`` | every transition and stage |
| ``POST /ai/slides/{id}/rerun`` | run a finished slide again |
| ``POST /ai/slides/{id}/dicom`` | convert a vendor file to a DICOM WSI series (body ``{"force": true}`` to redo) |
| ``DELETE /ai/slides/{id}`` | forget a slide and its files (DICOM results stay in Orthanc) |
| ``POST /ai/slides/worker/claim``, ``/ai/slides/{id}/heartbeat|qc-complete|complete|fail``, ``POST
  /ai/slides/{id}/dicom/heartbeat|complete|fail``, ``POST /ai/slides/{id}/artifacts/{name}``, ``GET
  /ai/slides/{id}/source?offset=&length=`` | the worker protocol |
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import secrets
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import sqlite_utils

from orthanc_plugin.events import RequestError, chain_changes
from orthanc_plugin.routes import RawBody, Request

log = logging.getLogger("orthanc_ai.slides")

PENDING, QC, QUEUED, RUNNING, DONE, FAILED, SKIPPED = "pending", "qc", "queued", "running", "done", "failed", "skipped"
STATES = (PENDING, QC, QUEUED, RUNNING, DONE, FAILED, SKIPPED)
TERMINAL = frozenset({DONE, FAILED, SKIPPED})
TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({QC, FAILED}),
    QC: frozenset({QUEUED, FAILED, SKIPPED, PENDING}),  # pending: a retry after a lost worker
    QUEUED: frozenset({RUNNING, FAILED}),
    RUNNING: frozenset({DONE, FAILED, SKIPPED, QUEUED}),  # queued: a retry
    DONE: frozenset({PENDING}),  # pending: an explicit re-run
    FAILED: frozenset({PENDING}),
    SKIPPED: frozenset({PENDING}),
}
#: The DICOM conversion of a vendor file, beside the slide's own state ("" = never requested).
DICOM_REQUESTED, DICOM_CONVERTING, DICOM_DONE, DICOM_FAILED = "requested", "converting", "done", "failed"
DICOM_TRANSITIONS: dict[str, frozenset[str]] = {
    "": frozenset({DICOM_REQUESTED}),
    DICOM_REQUESTED: frozenset({DICOM_CONVERTING, DICOM_FAILED}),
    DICOM_CONVERTING: frozenset({DICOM_DONE, DICOM_FAILED, DICOM_REQUESTED}),  # requested: a retry
    DICOM_DONE: frozenset({DICOM_REQUESTED}),  # an explicit conversion again (force)
    DICOM_FAILED: frozenset({DICOM_REQUESTED}),
}
#: Overall progress at the start of each stage (QC is quick, nuclei are most of the work).
STAGE_SPAN = {QC: (0.0, 0.25), RUNNING: (0.3, 1.0)}

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
OUR_MANUFACTURER = "Orthanc AI"
ARTIFACTS = {"thumbnail.png": "image/png", "tissue-mask.png": "image/png", "heatmap.png": "image/png",
             "report.json": "application/json", "nuclei.geojson.gz": "application/gzip"}
MAX_CHUNK = 64 * 1024 * 1024
#: Upload options of a raw-body POST, as headers (Orthanc drops the query string of POST requests).
_FIELD_HEADERS = {"mpp": "x-slide-mpp", "patient_id": "x-patient-id", "patient_name": "x-patient-name",
                  "accession_number": "x-accession-number", "study_instance_uid": "x-study-instance-uid",
                  "study_description": "x-study-description"}
_ID = r"[0-9a-f]{32}"
_NOT_SLIDES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"%PDF": "a PDF document",
               b"GIF8": "a GIF image", b"PK\x03\x04": "a ZIP archive", b"\x1f\x8b": "a gzip archive"}


class SlideError(RequestError):
    """A refused request on a slide; ``status`` is the HTTP status."""


def _now() -> float:
    return time.time()


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds") if ts else None


# -- configuration ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathologyConfig:
    """``AI.Pathology``, validated (a bad value names its key)."""

    enabled: bool = True
    nuclei_model: str = "classical-watershed"
    default_mpp: float | None = None
    inbox_directory: Path | None = None
    auto_dicom: bool = True
    store_dicom_results: bool = True
    workers: int = 2
    qc: dict | None = None
    aggregation: dict | None = None
    convert_to_dicom: bool = False

    _KEYS = {"Enabled", "NucleiModel", "DefaultMpp", "InboxDirectory", "AutoDicom", "StoreDicomResults", "Workers",
             "ConvertToDicom",
             "TileSize", "TileMpp", "MinTileTissue", "BlurThreshold", "MaxBlurRatio", "HotspotWindowMicrons",
             "HotspotCount"}

    @classmethod
    def parse(cls, section: Any, data_directory: Path) -> "PathologyConfig":
        section = {} if section is None else section
        if not isinstance(section, dict):
            raise ValueError('"AI.Pathology" must be a JSON object')
        unknown = sorted(set(section) - cls._KEYS)
        if unknown:
            raise ValueError(f'unknown key(s) in "AI.Pathology": {", ".join(unknown)} '
                             f'(known: {", ".join(sorted(cls._KEYS))})')

        def typed(key: str, kind: type | tuple, default: Any, check: Callable[[Any], bool] = lambda v: True,
                  what: str = "") -> Any:
            value = section.get(key, default)
            if value is None and default is None:
                return None
            if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) or not check(value):
                raise ValueError(f'"AI.Pathology.{key}" must be {what or kind}, not {value!r}')
            return value

        positive = (lambda v: v > 0)
        inbox = typed("InboxDirectory", str, str(data_directory / "slides-inbox"), what="a folder path")
        qc = {"tile_px": typed("TileSize", int, 224, lambda v: 32 <= v <= 2048, "an integer 32..2048"),
              "tile_mpp": float(typed("TileMpp", (int, float), 0.5, positive, "a positive number")),
              "min_tile_tissue": float(typed("MinTileTissue", (int, float), 0.5, lambda v: 0 <= v < 1, "0..1")),
              "blur_threshold": float(typed("BlurThreshold", (int, float), 60.0, positive, "a positive number")),
              "max_blur_ratio": float(typed("MaxBlurRatio", (int, float), 0.5, lambda v: 0 < v <= 1, "0..1"))}
        aggregation = {"hotspot_window_um": float(typed("HotspotWindowMicrons", (int, float), 500, positive,
                                                        "a positive number")),
                       "hotspot_count": typed("HotspotCount", int, 3, lambda v: 0 <= v <= 50, "an integer 0..50")}
        model = typed("NucleiModel", str, "classical-watershed", what="a model id or a bundle folder")
        if model != "classical-watershed" and not Path(model).is_dir():
            raise ValueError(f'"AI.Pathology.NucleiModel": {model} is neither "classical-watershed" nor a folder')
        mpp = typed("DefaultMpp", (int, float), None, positive, "a positive number of microns per pixel")
        return cls(enabled=typed("Enabled", bool, True), nuclei_model=model,
                   default_mpp=float(mpp) if mpp is not None else None,
                   inbox_directory=Path(inbox) if inbox else None, auto_dicom=typed("AutoDicom", bool, True),
                   store_dicom_results=typed("StoreDicomResults", bool, True),
                   workers=typed("Workers", int, 2, lambda v: 1 <= v <= 64, "an integer 1..64"),
                   qc=qc, aggregation=aggregation, convert_to_dicom=typed("ConvertToDicom", bool, False))


# -- the store ----------------------------------------------------------------------------------------
_COLUMNS = {
    "id": str, "state": str, "progress": float, "message": str, "error": str, "source_kind": str, "filename": str,
    "size_bytes": int, "sha256": str, "declared_mpp": float, "study": str, "orthanc_study_id": str,
    "orthanc_series_id": str, "study_instance_uid": str, "series_instance_uid": str, "fingerprint": str,
    "metadata": str, "qc": str, "summary": str, "outputs": str, "attempts": int, "max_attempts": int,
    "worker": str, "lease_token": str, "lease_expires": float, "created_at": float, "updated_at": float,
    "started_at": float, "finished_at": float, "timings": str,
    "dicom_state": str, "dicom": str, "dicom_attempts": int, "dicom_lease": str, "dicom_lease_expires": float,
}
_JSON = ("study", "metadata", "qc", "summary", "outputs", "timings", "dicom")


class SlideNotFound(SlideError):
    pass


class SlideStore:
    """Slides and their audit trail, in their own tables of the job store's SQLite file (WAL)."""

    def __init__(self, path: Path | str, files: Path, *, max_attempts: int = 3, lease_seconds: float = 30.0) -> None:
        self.files = Path(files)
        self.files.mkdir(parents=True, exist_ok=True)
        self.max_attempts, self.lease_seconds = max_attempts, lease_seconds
        self._lock = threading.RLock()
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        with self._lock:
            if "slides" not in self.db.table_names():
                self.db["slides"].create(_COLUMNS, pk="id", not_null={"state"})
                self.db["slides"].create_index(["state"])
                self.db["slides"].create_index(["series_instance_uid"])
            for column, kind in _COLUMNS.items():
                if column not in self.db["slides"].columns_dict:
                    self.db["slides"].add_column(column, kind)
            if "slide_audit" not in self.db.table_names():
                self.db["slide_audit"].create({"id": int, "ts": str, "slide_id": str, "event": str, "from_state": str,
                                               "to_state": str, "actor": str, "detail": str}, pk="id")
                self.db["slide_audit"].create_index(["slide_id"])

    def folder(self, slide_id: str) -> Path:
        return self.files / slide_id

    # reading
    def get(self, slide_id: str) -> dict:
        with self._lock:
            try:
                return self._decode(self.db["slides"].get(slide_id))
            except sqlite_utils.db.NotFoundError:
                raise SlideNotFound(f"no slide with id '{slide_id}'", status=404) from None

    def list(self, *, state: str | None = None, limit: int = 100, offset: int = 0) -> list[dict]:
        if state and state not in STATES:
            raise SlideError(f"unknown state '{state}'; expected one of {', '.join(STATES)}")
        with self._lock:
            rows = self.db["slides"].rows_where("state = ?" if state else None, [state] if state else [],
                                                order_by="created_at desc, rowid desc", limit=limit, offset=offset)
            return [self._decode(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self.db.execute("select state, count(*) from slides group by state").fetchall()
        return {s: 0 for s in STATES} | dict(rows)

    def find_series(self, series_instance_uid: str) -> list[dict]:
        with self._lock:
            return [self._decode(r) for r in self.db["slides"].rows_where(
                "series_instance_uid = ?", [series_instance_uid], order_by="created_at")]

    def audit(self, slide_id: str) -> list[dict]:
        with self._lock:
            return list(self.db["slide_audit"].rows_where("slide_id = ?", [slide_id], order_by="id"))

    # writing
    def create(self, *, source_kind: str, actor: str, filename: str | None = None, size_bytes: int | None = None,
               sha256: str | None = None, declared_mpp: float | None = None, study: dict | None = None,
               orthanc_study_id: str = "", orthanc_series_id: str = "", study_instance_uid: str = "",
               series_instance_uid: str = "", fingerprint: str = "", slide_id: str | None = None) -> dict:
        now = _now()
        row = {"id": slide_id or uuid.uuid4().hex, "state": PENDING, "progress": 0.0, "message": "waiting for a worker",
               "error": "", "source_kind": source_kind, "filename": filename or "", "size_bytes": size_bytes,
               "sha256": sha256 or "", "declared_mpp": declared_mpp, "study": json.dumps(study or {}),
               "orthanc_study_id": orthanc_study_id, "orthanc_series_id": orthanc_series_id,
               "study_instance_uid": study_instance_uid, "series_instance_uid": series_instance_uid,
               "fingerprint": fingerprint, "metadata": "{}", "qc": "{}", "summary": "{}", "outputs": "[]",
               "attempts": 0, "max_attempts": self.max_attempts, "worker": None, "lease_token": None,
               "lease_expires": None, "created_at": now, "updated_at": now, "started_at": None,
               "finished_at": None, "timings": "{}", "dicom_state": "", "dicom": "{}", "dicom_attempts": 0,
               "dicom_lease": None, "dicom_lease_expires": None}
        with self._lock:
            self.db["slides"].insert(row)
            self._log(row["id"], "created", None, PENDING, actor, f"source={source_kind} {filename or series_instance_uid}")
        return self.get(row["id"])

    def transition(self, slide_id: str, new: str, *, actor: str, lease: str | None = None, detail: str = "",
                   **changes: Any) -> dict:
        """Apply one legal transition (for the lease holder when ``lease`` is given) and audit it."""
        with self._lock:
            slide = self.get(slide_id)
            if new not in TRANSITIONS.get(slide["state"], ()):
                raise SlideError(f"a slide cannot go from '{slide['state']}' to '{new}'", status=409)
            if lease is not None:
                self._check_lease(slide, lease)
            for key in _JSON:
                if key in changes and not isinstance(changes[key], str):
                    changes[key] = json.dumps(changes[key])
            changes.update(state=new, updated_at=_now())
            if new in TERMINAL or new in (PENDING, QUEUED):
                changes.update(lease_token=None, lease_expires=None)
            self.db["slides"].update(slide_id, changes)
            self._log(slide_id, "transition", slide["state"], new, actor, detail or changes.get("error") or "")
            return self.get(slide_id)

    def claim(self, worker: str) -> dict | None:
        """The next slide for ``worker``: a queued one (its nuclei stage) first, else a pending one (its QC)."""
        self.release_expired()
        with self._lock:
            for state, new in ((QUEUED, RUNNING), (PENDING, QC)):
                rows = list(self.db["slides"].rows_where("state = ?", [state], order_by="created_at, rowid", limit=1))
                if rows:
                    row = rows[0]
                    start = STAGE_SPAN[new][0]
                    return self.transition(row["id"], new, actor=worker, worker=worker, attempts=row["attempts"] + 1,
                                           lease_token=secrets.token_hex(16), lease_expires=_now() + self.lease_seconds,
                                           started_at=row["started_at"] or _now(), progress=start,
                                           message=f"{'quality control' if new == QC else 'nuclei'} started",
                                           detail=worker)
        return None

    def heartbeat(self, slide_id: str, lease: str, progress: float | None, message: str | None) -> dict:
        with self._lock:
            slide = self.get(slide_id)
            self._check_lease(slide, lease)
            changes: dict[str, Any] = {"lease_expires": _now() + self.lease_seconds, "updated_at": _now()}
            if progress is not None:
                lo, hi = STAGE_SPAN[slide["state"]]
                changes["progress"] = round(lo + (hi - lo) * min(max(float(progress), 0.0), 1.0), 4)
            if message is not None:
                changes["message"] = str(message)[:300]
            self.db["slides"].update(slide_id, changes)
            return self.get(slide_id)

    def stage_log(self, slide_id: str, actor: str, timings: dict) -> None:
        """One audit line per pipeline stage, with its duration."""
        with self._lock:
            for stage, seconds in timings.items():
                self._log(slide_id, "stage", None, None, actor, f"{stage}: {seconds} s")

    def release_expired(self, now: float | None = None) -> list[dict]:
        now = _now() if now is None else now
        out = []
        with self._lock:
            for row in list(self.db["slides"].rows_where("state in ('qc', 'running') and lease_expires < ?", [now])):
                back = PENDING if row["state"] == QC else QUEUED
                if row["attempts"] < row["max_attempts"]:
                    out.append(self.transition(row["id"], back, actor="supervisor", worker=None,
                                               error="retrying: its worker stopped answering (lease expired)",
                                               message="waiting for a worker"))
                else:
                    out.append(self.transition(row["id"], FAILED, actor="supervisor", finished_at=now,
                                               error=f"gave up after {row['attempts']} attempts: its worker stopped "
                                                     "answering (lease expired)"))
            for row in list(self.db["slides"].rows_where("dicom_state = ? and dicom_lease_expires < ?",
                                                         [DICOM_CONVERTING, now])):
                attempts = row["dicom_attempts"] or 0
                if attempts < row["max_attempts"]:
                    out.append(self.dicom_transition(
                        row["id"], DICOM_REQUESTED, actor="supervisor", message="waiting for a worker",
                        error="retrying: its worker stopped answering (lease expired)"))
                else:
                    out.append(self.dicom_transition(
                        row["id"], DICOM_FAILED, actor="supervisor", finished_at=_iso(_now()),
                        error=f"gave up after {attempts} attempts: its worker stopped answering (lease expired)"))
        return out

    # the DICOM conversion --------------------------------------------------------------------------------
    def request_dicom(self, slide_id: str, actor: str, *, force: bool = False, detail: str = "") -> dict:
        """Queue the conversion of a vendor file (409 for a DICOM slide, a running or a done conversion
        unless ``force``, or a file that is gone)."""
        with self._lock:
            slide = self.get(slide_id)
            state = slide["dicom_state"] or ""
            if slide["source_kind"] == "dicom":
                raise SlideError(f"slide {slide_id} is already a DICOM WSI series in Orthanc", status=409)
            if state in (DICOM_REQUESTED, DICOM_CONVERTING):
                raise SlideError(f"slide {slide_id} is already being converted ('{state}')", status=409)
            if state == DICOM_DONE and not force:
                raise SlideError(f"slide {slide_id} was already converted (series "
                                 f"{slide['dicom'].get('series_instance_uid')}); send {{\"force\": true}} to "
                                 "convert it again (the series is replaced)", status=409)
            if not (self.folder(slide_id) / "source").is_file():
                raise SlideError(f"the file of slide {slide_id} is gone; upload it again", status=409)
            return self.dicom_transition(slide_id, DICOM_REQUESTED, actor=actor, reset=True, attempts=0,
                                         detail=detail or ("conversion requested again" if state else
                                                           "conversion requested"),
                                         requested_at=_iso(_now()), requested_by=actor,
                                         message="waiting for a worker")

    def dicom_transition(self, slide_id: str, new: str, *, actor: str, lease: str | None = None,
                         detail: str = "", reset: bool = False, attempts: int | None = None, **info: Any) -> dict:
        """One legal step of the conversion (for the lease holder when ``lease`` is given), audited."""
        with self._lock:
            slide = self.get(slide_id)
            old = slide["dicom_state"] or ""
            if new not in DICOM_TRANSITIONS.get(old, ()):
                raise SlideError(f"a conversion cannot go from '{old or 'none'}' to '{new}'", status=409)
            if lease is not None:
                self._check_dicom_lease(slide, lease)
            dicom = {} if reset else dict(slide["dicom"] or {})
            dicom.update(info)
            changes: dict[str, Any] = {"dicom_state": new, "dicom": json.dumps(dicom), "updated_at": _now()}
            if attempts is not None:
                changes["dicom_attempts"] = attempts
            if new != DICOM_CONVERTING:
                changes.update(dicom_lease=None, dicom_lease_expires=None)
            self.db["slides"].update(slide_id, changes)
            self._log(slide_id, "dicom", old or None, new, actor, detail or dicom.get("error") or "")
            return self.get(slide_id)

    def claim_dicom(self, worker: str) -> dict | None:
        """The oldest requested conversion, now ``converting`` for ``worker`` with a lease."""
        self.release_expired()
        with self._lock:
            rows = list(self.db["slides"].rows_where("dicom_state = ?", [DICOM_REQUESTED],
                                                     order_by="created_at, rowid", limit=1))
            if not rows:
                return None
            row = rows[0]
            slide = self.dicom_transition(row["id"], DICOM_CONVERTING, actor=worker, detail=worker,
                                          attempts=(row["dicom_attempts"] or 0) + 1, worker=worker,
                                          started_at=_iso(_now()), progress=0.0, message="conversion started",
                                          error=None)
            self.db["slides"].update(row["id"], {"dicom_lease": secrets.token_hex(16),
                                                 "dicom_lease_expires": _now() + self.lease_seconds})
            return self.get(slide["id"])

    def dicom_heartbeat(self, slide_id: str, lease: str, progress: float | None, message: str | None) -> dict:
        with self._lock:
            slide = self.get(slide_id)
            self._check_dicom_lease(slide, lease)
            dicom = dict(slide["dicom"] or {})
            if progress is not None:
                dicom["progress"] = round(min(max(float(progress), 0.0), 1.0), 4)
            if message is not None:
                dicom["message"] = str(message)[:300]
            self.db["slides"].update(slide_id, {"dicom": json.dumps(dicom),
                                                "dicom_lease_expires": _now() + self.lease_seconds})
            return self.get(slide_id)

    def _check_dicom_lease(self, slide: dict, lease: str) -> None:
        if slide["dicom_state"] != DICOM_CONVERTING or not lease or slide["dicom_lease"] != lease:
            raise SlideError(f"the conversion of slide {slide['id']} is '{slide['dicom_state'] or 'none'}' and no "
                             "longer held by this lease", status=409)

    def delete(self, slide_id: str, actor: str) -> dict:
        with self._lock:
            slide = self.get(slide_id)
            self.db["slides"].delete(slide_id)
            self._log(slide_id, "deleted", slide["state"], None, actor, "")
        shutil.rmtree(self.folder(slide_id), ignore_errors=True)
        return slide

    def _check_lease(self, slide: dict, lease: str) -> None:
        if slide["state"] not in (QC, RUNNING) or not lease or slide["lease_token"] != lease:
            raise SlideError(f"slide {slide['id']} is '{slide['state']}' and no longer held by this lease", status=409)

    def _log(self, slide_id: str, event: str, old: str | None, new: str | None, actor: str, detail: str) -> None:
        self.db["slide_audit"].insert({"ts": _iso(_now()), "slide_id": slide_id, "event": event, "from_state": old,
                                       "to_state": new, "actor": actor, "detail": str(detail)[:1000]})

    @staticmethod
    def _decode(row: dict) -> dict:
        row = dict(row)
        for key in _JSON:
            row[key] = json.loads(row.get(key) or ("[]" if key == "outputs" else "{}"))
        row["dicom_state"] = row.get("dicom_state") or ""
        return row

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()


def public_view(slide: dict, folder: Path | None = None) -> dict:
    """A slide as the REST API shows it (no lease token; the QC tile grid left out)."""
    qc = dict(slide.get("qc") or {})
    qc.pop("tiles", None)
    out = {"id": slide["id"], "status": slide["state"], "progress": slide["progress"], "message": slide["message"],
           "error": slide["error"] or None, "attempts": slide["attempts"],
           "source": {"kind": slide["source_kind"], "filename": slide["filename"] or None,
                      "size_bytes": slide["size_bytes"], "sha256": slide["sha256"] or None,
                      "study_instance_uid": slide["study_instance_uid"] or None,
                      "series_instance_uid": slide["series_instance_uid"] or None},
           "metadata": slide["metadata"] or None, "quality_control": qc.get("quality_control"),
           "tiles": qc.get("tile_counts"), "results": slide["summary"] or None, "outputs": slide["outputs"],
           "created_at": _iso(slide["created_at"]), "updated_at": _iso(slide["updated_at"]),
           "started_at": _iso(slide["started_at"]), "finished_at": _iso(slide["finished_at"]),
           "dicom": dicom_view(slide)}
    if folder is not None:
        out["files"] = sorted(p.name for p in folder.iterdir() if p.name in ARTIFACTS) if folder.is_dir() else []
    return out


_DICOM_FIELDS = ("progress", "message", "error", "requested_at", "requested_by", "started_at", "finished_at",
                 "seconds", "study_instance_uid", "series_instance_uid", "orthanc_study_id", "orthanc_series_id",
                 "instances", "levels", "dicomizer", "annotations", "timings")


def dicom_view(slide: dict) -> dict | None:
    """The conversion to DICOM WSI as the REST API shows it; None when it was never requested."""
    if not slide.get("dicom_state"):
        return None
    info = slide.get("dicom") or {}
    return {"status": slide["dicom_state"], "attempts": slide.get("dicom_attempts") or 0,
            **{key: info.get(key) for key in _DICOM_FIELDS}}


# -- multipart ----------------------------------------------------------------------------------------
def sniff(head: bytes) -> str | None:
    """Why ``head`` (the first bytes) cannot be a slide, or None when it may be one (the worker decides)."""
    for magic, what in _NOT_SLIDES.items():
        if head.startswith(magic):
            return f"the file is {what}, not a whole-slide image (SVS, NDPI, MRXS, TIFF or DICOM)"
    if len(head) < 8:
        return "the file is empty"
    return None


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], tuple[str, memoryview] | None]:
    """(text fields, (filename, content) of the part named ``file``) of a multipart body (``mixed``,
    ``related``; Orthanc splits ``form-data`` itself).

    The file content is a view into ``body``: a large upload is not copied.
    """
    m = re.search(r'boundary="?([^";]+)"?', content_type or "", re.I)
    if not m or not (content_type or "").lower().startswith("multipart/"):
        raise SlideError('send the slide as the request body, or as a multipart body with a part named "file"',
                         status=415)
    boundary = b"--" + m.group(1).encode()
    view = memoryview(body)
    fields: dict[str, str] = {}
    file_part = None
    pos = body.find(boundary)
    while pos >= 0:
        start = pos + len(boundary)
        if body[start:start + 2] == b"--":
            break
        header_end = body.find(b"\r\n\r\n", start)
        if header_end < 0:
            break
        headers = body[start:header_end].decode("utf-8", "replace")
        nxt = body.find(b"\r\n" + boundary, header_end + 4)
        if nxt < 0:
            raise SlideError("the multipart body is truncated (no closing boundary)")
        content = view[header_end + 4:nxt]
        disposition = re.search(r'content-disposition:[^\r\n]*', headers, re.I)
        name = re.search(r'\bname="([^"]*)"', disposition.group(0)) if disposition else None
        filename = re.search(r'filename="([^"]*)"', disposition.group(0)) if disposition else None
        if name and name.group(1) == "file":
            file_part = (filename.group(1) if filename else "slide", content)
        elif name:
            fields[name.group(1)] = bytes(content).decode("utf-8", "replace").strip()
        pos = nxt + 2
    return fields, file_part


# -- the service ----------------------------------------------------------------------------------------
class Slides:
    """Routes, intake (upload, inbox, DICOM series) and the worker protocol around a :class:`SlideStore`."""

    def __init__(self, store: SlideStore, config: PathologyConfig, rest: Any = None, *, lease_seconds: float = 30.0
                 ) -> None:
        self.store, self.config, self.rest = store, config, rest
        self.lease_seconds = lease_seconds
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._inbox_sizes: dict[str, int] = {}
        self.change_types: dict[Any, str] = {}
        self._form_fields: dict[int, tuple[float, dict[str, str]]] = {}  # thread -> (time, fields before "file")

    # intake ---------------------------------------------------------------------------------------------
    def add_file(self, source: Path | memoryview | bytes, filename: str, *, kind: str, actor: str,
                 fields: dict[str, str] | None = None) -> dict:
        """Store a vendor file (moved when ``source`` is a path) and create its slide."""
        fields = fields or {}
        mpp = fields.get("mpp")
        try:
            declared = float(mpp) if mpp not in (None, "") else None
        except ValueError:
            raise SlideError(f'"mpp" must be a number of microns per pixel, not {mpp!r}') from None
        if declared is not None and not 0.05 <= declared <= 100:
            raise SlideError(f'"mpp" must be between 0.05 and 100 microns per pixel, not {declared}')
        slide_id = uuid.uuid4().hex
        folder = self.store.folder(slide_id)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "source"
        digest = hashlib.sha256()
        if isinstance(source, Path):
            shutil.move(str(source), target)
            with open(target, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
        else:
            with open(target, "wb") as f:
                for i in range(0, len(source), 1 << 22):
                    chunk = source[i:i + (1 << 22)]
                    digest.update(chunk)
                    f.write(chunk)
        study = {k: fields[k] for k in ("patient_id", "patient_name", "accession_number", "study_instance_uid",
                                        "study_description") if fields.get(k)}
        slide = self.store.create(source_kind=kind, actor=actor, filename=Path(filename).name[:200],
                                  size_bytes=target.stat().st_size, sha256=digest.hexdigest(), declared_mpp=declared,
                                  study=study, study_instance_uid=study.get("study_instance_uid", ""),
                                  slide_id=slide_id)
        with open(target, "rb") as f:
            reason = sniff(f.read(132))
        if reason:
            slide = self.store.transition(slide_id, FAILED, actor=actor, error=f"unsupported format: {reason}",
                                          finished_at=_now(), progress=1.0, message="")
        return slide

    def add_series(self, orthanc_series_id: str, series: dict, *, actor: str) -> dict:
        tags = series.get("MainDicomTags", {})
        return self.store.create(source_kind="dicom", actor=actor, filename=tags.get("SeriesDescription") or None,
                                 orthanc_study_id=series.get("ParentStudy", ""), orthanc_series_id=orthanc_series_id,
                                 study_instance_uid=series.get("_study_uid", ""),
                                 series_instance_uid=tags.get("SeriesInstanceUID", ""),
                                 fingerprint=f"instances={len(series.get('Instances', []))}")

    def scan_inbox(self) -> list[dict]:
        """Files whose size did not change since the previous scan become slides (moved out of the inbox)."""
        inbox = self.config.inbox_directory
        if inbox is None:
            return []
        inbox.mkdir(parents=True, exist_ok=True)
        created, seen = [], {}
        for path in sorted(inbox.iterdir()):
            if not path.is_file() or path.name.startswith(".") or path.suffix in (".part", ".tmp", ".crdownload"):
                continue
            size = path.stat().st_size
            seen[path.name] = size
            if self._inbox_sizes.get(path.name) == size:
                try:
                    created.append(self.add_file(path, path.name, kind="inbox", actor="inbox"))
                    seen.pop(path.name)
                except Exception:
                    log.exception("inbox file %s could not be taken", path)
        self._inbox_sizes = seen
        return created

    def on_stable_series(self, orthanc_series_id: str) -> dict | None:
        """A stable series: a slide when it is a DICOM WSI series (not ours) not seen before."""
        series = json.loads(self.rest.get(f"/series/{orthanc_series_id}"))
        instances = series.get("Instances", [])
        if not instances:
            return None
        try:
            sop_class = self.rest.get(f"/instances/{instances[0]}/metadata/SopClassUid").decode().strip()
        except Exception:
            sop_class = json.loads(self.rest.get(f"/instances/{instances[0]}/simplified-tags")).get("SOPClassUID", "")
        if sop_class != WSI_SOP_CLASS:
            return None
        tags = series.get("MainDicomTags", {})
        if tags.get("Manufacturer") == OUR_MANUFACTURER:
            return None
        fingerprint = f"instances={len(instances)}"
        for known in self.store.find_series(tags.get("SeriesInstanceUID", "")):
            if known["fingerprint"] == fingerprint:
                return None
        study = json.loads(self.rest.get(f"/studies/{series['ParentStudy']}"))
        series["_study_uid"] = study.get("MainDicomTags", {}).get("StudyInstanceUID", "")
        slide = self.add_series(orthanc_series_id, series, actor="system")
        log.info("DICOM WSI series %s became slide %s", tags.get("SeriesInstanceUID"), slide["id"])
        return slide

    # Orthanc events ---------------------------------------------------------------------------------------
    def use_orthanc_enums(self, orthanc_module: Any) -> "Slides":
        for name in ("STABLE_SERIES", "ORTHANC_STARTED", "ORTHANC_STOPPED"):
            self.change_types[getattr(orthanc_module.ChangeType, name)] = name
        return self

    def on_change(self, change_type: Any, level: Any, resource_id: str) -> None:
        kind = self.change_types.get(change_type, change_type)
        if kind == "STABLE_SERIES" and self.config.auto_dicom:
            self._queue.put(resource_id)
        elif kind == "ORTHANC_STARTED":
            self.start()
        elif kind == "ORTHANC_STOPPED":
            self.stop()

    def chain(self, inner: Callable[[Any, Any, str], None]) -> Callable[[Any, Any, str], None]:
        """An on-change callback that calls ``inner`` and then ours (Orthanc takes one change callback)."""
        return chain_changes(inner, self.on_change)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ai-slides", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                item = None
            if item is None and self._stop.is_set():
                return
            try:
                if item is not None:
                    self.on_stable_series(item)
                if time.time() >= next_scan:
                    next_scan = time.time() + 3.0
                    self.scan_inbox()
                    self.store.release_expired()
            except Exception:  # a bad series or file must not stop intake
                log.exception("slide intake failed")

    # routes -----------------------------------------------------------------------------------------------
    def routes(self) -> list[tuple[str, str, Callable[..., tuple[int, Any]]]]:
        return [
            ("POST", r"slides", self.post_slide),
            # the same upload as a form whose answer is ours: Orthanc answers every multipart/form-data POST
            # itself, but not a PUT (``curl -T``/``-X PUT -F``, or a POST with X-HTTP-Method-Override: PUT)
            ("PUT", r"slides", self.post_slide),
            ("GET", r"slides", self.list_slides),
            ("POST", r"slides/worker/claim", self.claim),
            ("GET", rf"slides/({_ID})", self.get_slide),
            ("DELETE", rf"slides/({_ID})", self.delete_slide),
            ("GET", rf"slides/({_ID})/(thumbnail|tissue-mask|heatmap)", self.get_png),
            ("GET", rf"slides/({_ID})/report", self.get_report),
            ("GET", rf"slides/({_ID})/nuclei\.geojson\.gz", self.get_geojson),
            ("GET", rf"slides/({_ID})/audit", self.get_audit),
            ("POST", rf"slides/({_ID})/rerun", self.rerun),
            ("GET", rf"slides/({_ID})/source", self.get_source),
            ("POST", rf"slides/({_ID})/heartbeat", self.heartbeat),
            ("POST", rf"slides/({_ID})/artifacts/([a-z.\-]+)", self.put_artifact),
            ("POST", rf"slides/({_ID})/qc-complete", self.qc_complete),
            ("POST", rf"slides/({_ID})/complete", self.complete),
            ("POST", rf"slides/({_ID})/fail", self.fail),
            ("POST", rf"slides/({_ID})/dicom", self.request_dicom),
            ("POST", rf"slides/({_ID})/dicom/heartbeat", self.dicom_heartbeat),
            ("POST", rf"slides/({_ID})/dicom/complete", self.dicom_complete),
            ("POST", rf"slides/({_ID})/dicom/fail", self.dicom_fail),
        ]

    def view(self, slide: dict) -> dict:
        return public_view(slide, self.store.folder(slide["id"]))

    def post_slide(self, request: Request) -> tuple[int, Any]:
        """A raw body (the slide file) or a ``multipart/mixed|related`` body → 202 with the slide; a JSON body
        names an Orthanc series; a ``multipart/form-data`` part (see :meth:`_form_part`)."""
        disposition = _header(request, "content-disposition")
        if disposition.lower().startswith("form-data"):
            return self._form_part(request, disposition)
        content_type = _header(request, "content-type")
        if content_type.lower().startswith("application/json"):
            return 202, self.view(self._series_slide(request))
        if content_type.lower().startswith("multipart/"):
            fields, part = parse_multipart(request.body, content_type)
            if part is None:
                raise SlideError('the multipart body has no part named "file"')
            filename, content = part
        else:
            fields = {key: _header(request, header) for key, header in _FIELD_HEADERS.items()
                      if _header(request, header)}
            name = re.search(r'filename="?([^";]+)"?', disposition or "")
            filename, content = (name.group(1) if name else "slide"), memoryview(request.body)
        reason = sniff(bytes(content[:132]))
        if reason:
            raise SlideError(f"unsupported format: {reason}", status=415)
        return 202, self.view(self.add_file(content, filename, kind="upload", actor=request.user, fields=fields))

    def _form_part(self, request: Request, disposition: str) -> tuple[int, Any]:
        """One part of a ``multipart/form-data`` upload (an HTML form, ``curl -F``).

        Orthanc itself answers such requests (an empty 200, in every version: its HTTP server splits forms
        for Orthanc Explorer's uploads) and hands each part to the plugin in order, on the request's thread,
        without the other headers. So text fields are kept per thread until the ``file`` part arrives (send
        them first, as browsers and curl do in form order); the slide then shows up in ``GET /ai/slides``.
        """
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'filename="([^"]*)"', disposition)
        key = threading.get_ident()
        now = _now()
        stamp, fields = self._form_fields.pop(key, (0.0, {}))
        if now - stamp > 60:  # left over from a form that never sent its file
            fields = {}
        if not name or name.group(1) != "file":
            if name:
                fields[name.group(1)] = bytes(request.body[:1000]).decode("utf-8", "replace").strip()
            self._form_fields[key] = (now, fields)
            return 200, {}
        return 202, self.view(self.add_file(memoryview(request.body), filename.group(1) if filename else "slide",
                                            kind="upload", actor="form upload", fields=fields))

    def _series_slide(self, request: Request) -> dict:
        body = request.json()
        uid = body.get("series_instance_uid")
        if not isinstance(uid, str) or not re.fullmatch(r"[0-9.]{1,64}", uid):
            raise SlideError('"series_instance_uid" (a DICOM WSI series in Orthanc) is required')
        if self.rest is None:
            raise SlideError("Orthanc is not reachable from here", status=503)
        hits = [h for h in json.loads(self.rest.post("/tools/lookup", uid)) if h.get("Type") == "Series"]
        if not hits:
            raise SlideError(f"no series with SeriesInstanceUID {uid} in Orthanc", status=404)
        series = json.loads(self.rest.get(f"/series/{hits[0]['ID']}"))
        study = json.loads(self.rest.get(f"/studies/{series['ParentStudy']}"))
        series["_study_uid"] = study.get("MainDicomTags", {}).get("StudyInstanceUID", "")
        return self.add_series(hits[0]["ID"], series, actor=request.user)

    def list_slides(self, request: Request) -> tuple[int, Any]:
        try:
            limit, offset = int(request.query.get("limit", "100")), int(request.query.get("offset", "0"))
        except ValueError:
            raise SlideError("limit and offset must be integers") from None
        if not 1 <= limit <= 1000 or offset < 0:
            raise SlideError("limit must be 1..1000 and offset ≥ 0")
        self.store.release_expired()
        slides = self.store.list(state=request.query.get("state") or None, limit=limit, offset=offset)
        return 200, {"slides": [self.view(s) for s in slides], "counts": self.store.counts()}

    def get_slide(self, request: Request, slide_id: str) -> tuple[int, Any]:
        return 200, self.view(self.store.get(slide_id))

    def delete_slide(self, request: Request, slide_id: str) -> tuple[int, Any]:
        slide = self.store.delete(slide_id, request.user)
        return 200, {"deleted": slide_id, "status": slide["state"],
                     "note": "the slide and its files are gone; DICOM results stay in Orthanc"}

    def _artifact(self, slide_id: str, name: str) -> bytes:
        slide = self.store.get(slide_id)
        path = self.store.folder(slide_id) / name
        if not path.is_file():
            raise SlideError(f"{name} of slide {slide_id} is not available (the slide is '{slide['state']}')",
                             status=404)
        return path.read_bytes()

    def get_png(self, request: Request, slide_id: str, which: str) -> tuple[int, Any]:
        return 200, RawBody(self._artifact(slide_id, f"{which}.png"), "image/png")

    def get_report(self, request: Request, slide_id: str) -> tuple[int, Any]:
        return 200, json.loads(self._artifact(slide_id, "report.json"))

    def get_geojson(self, request: Request, slide_id: str) -> tuple[int, Any]:
        return 200, RawBody(self._artifact(slide_id, "nuclei.geojson.gz"), "application/gzip")

    def get_audit(self, request: Request, slide_id: str) -> tuple[int, Any]:
        self.store.get(slide_id)
        return 200, {"audit": self.store.audit(slide_id)}

    def rerun(self, request: Request, slide_id: str) -> tuple[int, Any]:
        slide = self.store.get(slide_id)
        if slide["state"] not in TERMINAL:
            raise SlideError(f"slide {slide_id} is '{slide['state']}': wait until it is finished", status=409)
        if slide["source_kind"] != "dicom" and not (self.store.folder(slide_id) / "source").is_file():
            raise SlideError("the slide's file is gone; upload it again", status=409)
        return 202, self.view(self.store.transition(slide_id, PENDING, actor=request.user, error="", attempts=0,
                                                    progress=0.0, message="waiting for a worker", finished_at=None,
                                                    started_at=None, summary={}, outputs=[], detail="re-run"))

    def request_dicom(self, request: Request, slide_id: str) -> tuple[int, Any]:
        """Convert a vendor file to a DICOM WSI series (a worker runs it) → 202 with the slide."""
        body = request.json()
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise SlideError('"force" must be true or false')
        return 202, self.view(self.store.request_dicom(slide_id, request.user, force=force))

    def _auto_dicom(self, slide: dict) -> None:
        """``AI.Pathology.ConvertToDicom``: queue the conversion of a vendor file the worker could read."""
        if not self.config.convert_to_dicom or slide["source_kind"] == "dicom":
            return
        if slide["dicom_state"] in (DICOM_REQUESTED, DICOM_CONVERTING, DICOM_DONE):
            return
        if not (slide.get("metadata") or {}).get("mpp_x"):
            return  # no pixel size: the conversion would fail too; it can still be requested after a re-run
        try:
            self.store.request_dicom(slide["id"], "system", detail="AI.Pathology.ConvertToDicom")
        except SlideError as exc:
            log.warning("slide %s: no automatic conversion to DICOM (%s)", slide["id"], exc)

    # worker protocol --------------------------------------------------------------------------------------
    def claim(self, request: Request) -> tuple[int, Any]:
        body = request.json()
        worker = body.get("worker")
        if not isinstance(worker, str) or not worker:
            raise SlideError('"worker" (an id for the claiming worker) is required')
        if not self.config.enabled:
            return 204, None
        cfg = self.config
        slide = self.store.claim_dicom(worker)  # conversions first: short, and someone may be waiting to view
        if slide is not None:
            return 200, {"slide": {**self.view(slide), "study": slide["study"]}, "stage": "dicom",
                         "lease": slide["dicom_lease"], "lease_seconds": self.lease_seconds,
                         "settings": {"declared_mpp": slide["declared_mpp"] or cfg.default_mpp,
                                      "workers": cfg.workers}}
        slide = self.store.claim(worker)
        if slide is None:
            return 204, None
        settings = {"declared_mpp": slide["declared_mpp"] or cfg.default_mpp, "nuclei_model": cfg.nuclei_model,
                    "workers": cfg.workers, "qc": cfg.qc or {}, "aggregation": cfg.aggregation or {},
                    "store_dicom_results": cfg.store_dicom_results}
        return 200, {"slide": {**self.view(slide), "orthanc_series_id": slide["orthanc_series_id"],
                               "study": slide["study"]},
                     "stage": "qc" if slide["state"] == QC else "analysis", "lease": slide["lease_token"],
                     "lease_seconds": self.lease_seconds, "settings": settings,
                     "qc_state": slide["qc"] if slide["state"] == RUNNING else None}

    @staticmethod
    def _lease(body: dict) -> str:
        lease = body.get("lease")
        if not isinstance(lease, str) or not lease:
            raise SlideError('"lease" (the token returned by the claim) is required')
        return lease

    @staticmethod
    def _progress(body: dict) -> float | None:
        progress = body.get("progress")
        if progress is not None and (isinstance(progress, bool) or not isinstance(progress, (int, float))):
            raise SlideError('"progress" must be a number between 0 and 1')
        return progress

    def heartbeat(self, request: Request, slide_id: str) -> tuple[int, Any]:
        body = request.json()
        progress = self._progress(body)
        slide = self.store.heartbeat(slide_id, self._lease(body), progress, body.get("message"))
        return 200, {"status": slide["state"], "cancel": False}

    def get_source(self, request: Request, slide_id: str) -> tuple[int, Any]:
        slide = self.store.get(slide_id)
        path = self.store.folder(slide_id) / "source"
        if not path.is_file():
            raise SlideError(f"slide {slide_id} has no stored file ({slide['source_kind']})", status=404)
        try:
            offset = int(request.query.get("offset", "0"))
            length = min(int(request.query.get("length", str(MAX_CHUNK))), MAX_CHUNK)
        except ValueError:
            raise SlideError("offset and length must be integers") from None
        with open(path, "rb") as f:
            f.seek(max(0, offset))
            return 200, RawBody(f.read(max(0, length)), "application/octet-stream")

    def put_artifact(self, request: Request, slide_id: str, name: str) -> tuple[int, Any]:
        if name not in ARTIFACTS:
            raise SlideError(f"unknown artifact {name!r}; expected one of {', '.join(sorted(ARTIFACTS))}")
        slide = self.store.get(slide_id)
        self.store._check_lease(slide, _header(request, "x-slide-lease") or request.query.get("lease", ""))
        folder = self.store.folder(slide_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(request.body)
        os.replace(tmp, folder / name)
        return 200, {"stored": name, "bytes": len(request.body)}

    def qc_complete(self, request: Request, slide_id: str) -> tuple[int, Any]:
        """The QC stage's outcome: ``pass`` → queued, ``fail`` → failed, ``empty`` → skipped."""
        body = request.json()
        lease = self._lease(body)
        outcome = body.get("outcome")
        if outcome not in ("pass", "fail", "empty"):
            raise SlideError('"outcome" must be "pass", "fail" or "empty"')
        worker = str(body.get("worker", "worker"))
        timings = body.get("timings") or {}
        changes = {"metadata": body.get("metadata") or {}, "qc": body.get("qc_state") or {},
                   "timings": timings}
        if outcome == "pass":
            slide = self.store.transition(slide_id, QUEUED, actor=worker, lease=lease, progress=STAGE_SPAN[QC][1],
                                          message="quality control passed; waiting for the nuclei stage", error="",
                                          **changes)
        else:
            error = str(body.get("error") or "quality control failed")
            slide = self.store.transition(slide_id, FAILED if outcome == "fail" else SKIPPED, actor=worker,
                                          lease=lease, error=error, progress=1.0, message="", finished_at=_now(),
                                          **changes)
        self.store.stage_log(slide_id, worker, timings)
        if outcome != "pass":
            self._auto_dicom(slide)
        return 200, self.view(self.store.get(slide_id))

    def complete(self, request: Request, slide_id: str) -> tuple[int, Any]:
        body = request.json()
        lease = self._lease(body)
        outputs = body.get("outputs", [])
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            raise SlideError('"outputs" must be a list of SOP Instance UIDs')
        worker = str(body.get("worker", "worker"))
        slide = self.store.get(slide_id)
        timings = {**(slide["timings"] or {}), **(body.get("timings") or {})}
        slide = self.store.transition(slide_id, DONE, actor=worker, lease=lease, outputs=outputs,
                                      summary=body.get("summary") or {}, timings=timings, progress=1.0,
                                      message="done", error="", finished_at=_now())
        self.store.stage_log(slide_id, worker, body.get("timings") or {})
        self._auto_dicom(slide)
        return 200, self.view(self.store.get(slide_id))

    def _failure(self, request: Request) -> tuple[dict, str, str, str]:
        """A worker's failure report: its body, lease, error sentence and worker id."""
        body = request.json()
        error = body.get("error")
        lease = self._lease(body)
        if not isinstance(error, str) or not error:
            raise SlideError('"error" (a sentence for the user) is required')
        return body, lease, error, str(body.get("worker", "worker"))

    def fail(self, request: Request, slide_id: str) -> tuple[int, Any]:
        body, lease, error, worker = self._failure(request)
        slide = self.store.get(slide_id)
        self.store._check_lease(slide, lease)
        extra = {"metadata": body["metadata"]} if body.get("metadata") else {}
        if body.get("retryable") and slide["attempts"] < slide["max_attempts"]:
            back = PENDING if slide["state"] == QC else QUEUED
            slide = self.store.transition(slide_id, back, actor=worker, lease=lease, error=f"retrying: {error}",
                                          message="waiting for a worker", worker=None, **extra)
        else:
            slide = self.store.transition(slide_id, SKIPPED if body.get("skipped") else FAILED, actor=worker,
                                          lease=lease, error=error, progress=1.0, message="", finished_at=_now(),
                                          **extra)
        return 200, self.view(slide)

    # the conversion's worker protocol
    def dicom_heartbeat(self, request: Request, slide_id: str) -> tuple[int, Any]:
        body = request.json()
        progress = self._progress(body)
        slide = self.store.dicom_heartbeat(slide_id, self._lease(body), progress, body.get("message"))
        return 200, {"status": slide["dicom_state"], "cancel": False}

    def dicom_complete(self, request: Request, slide_id: str) -> tuple[int, Any]:
        """The series is in Orthanc: its UIDs, instance count, levels and timings."""
        body = request.json()
        lease = self._lease(body)
        info: dict[str, Any] = {}
        for key in ("study_instance_uid", "series_instance_uid"):
            value = body.get(key)
            if not isinstance(value, str) or not re.fullmatch(r"[0-9.]{1,64}", value):
                raise SlideError(f'"{key}" (a DICOM UID) is required')
            info[key] = value
        instances = body.get("instances")
        if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
            raise SlideError('"instances" (the number of instances stored) is required')
        timings = body.get("timings") or {}
        if not isinstance(timings, dict):
            raise SlideError('"timings" must be an object of seconds')
        seconds = round(sum(v for v in timings.values() if isinstance(v, (int, float))), 3)
        worker = str(body.get("worker", "worker"))
        annotations = body.get("annotations")
        if annotations is not None and (isinstance(annotations, bool) or not isinstance(annotations, int)):
            raise SlideError('"annotations" must be the number of nuclei annotated')
        info.update(instances=instances, timings=timings, seconds=seconds, progress=1.0, message="done", error=None,
                    annotations=annotations,
                    finished_at=_iso(_now()), levels=body.get("levels"), dicomizer=body.get("dicomizer"),
                    orthanc_study_id=body.get("orthanc_study_id"), orthanc_series_id=body.get("orthanc_series_id"))
        slide = self.store.dicom_transition(
            slide_id, DICOM_DONE, actor=worker, lease=lease,
            detail=f"{instances} instance(s) in series {info['series_instance_uid']}, {seconds} s "
                   f"({', '.join(f'{k} {v} s' for k, v in timings.items())})", **info)
        log.info("slide %s converted to DICOM WSI: %s instance(s) in %s s", slide_id, instances, seconds)
        return 200, self.view(slide)

    def dicom_fail(self, request: Request, slide_id: str) -> tuple[int, Any]:
        body, lease, error, worker = self._failure(request)
        slide = self.store.get(slide_id)
        self.store._check_dicom_lease(slide, lease)
        if body.get("retryable") and (slide["dicom_attempts"] or 0) < slide["max_attempts"]:
            slide = self.store.dicom_transition(slide_id, DICOM_REQUESTED, actor=worker, lease=lease,
                                                error=f"retrying: {error}"[:1000], message="waiting for a worker")
        else:
            slide = self.store.dicom_transition(slide_id, DICOM_FAILED, actor=worker, lease=lease,
                                                error=error[:1000], message="", finished_at=_iso(_now()))
        log.warning("slide %s: conversion to DICOM failed%s", slide_id,
                    " (to be retried)" if slide["dicom_state"] == DICOM_REQUESTED else "")
        return 200, self.view(slide)


def _header(request: Request, name: str) -> str:
    for key, value in (request.headers or {}).items():
        if key.lower() == name:
            return str(value)
    return ""


class PluginRest:
    """Orthanc's REST API from our own thread (never from inside a callback)."""

    def __init__(self, orthanc_module: Any) -> None:
        self.orthanc = orthanc_module

    def get(self, uri: str) -> bytes:
        data = self.orthanc.RestApiGet(uri)
        return data if isinstance(data, bytes) else str(data).encode()

    def post(self, uri: str, body: str) -> bytes:
        data = self.orthanc.RestApiPost(uri, body)
        return data if isinstance(data, bytes) else str(data).encode()


def register(orthanc_module: Any, api: Any, job_store_path: Path | str, data_directory: Path, section: Any, *,
             lease_seconds: float = 30.0, max_attempts: int = 3) -> Slides:
    """Wire slides into the plugin: the store beside the jobs, the routes, intake; chain :meth:`Slides.chain`."""
    try:
        config = PathologyConfig.parse(section, Path(data_directory))
    except ValueError as exc:  # like every bad "AI" value: stop start-up, naming the key
        orthanc_module.LogError(f"[ai] configuration error: {exc}")
        raise SystemExit(f"orthanc-ai: configuration error: {exc}") from None
    store = SlideStore(job_store_path, Path(data_directory) / "slides", max_attempts=max_attempts,
                       lease_seconds=max(lease_seconds, 30.0))
    service = Slides(store, config, PluginRest(orthanc_module), lease_seconds=store.lease_seconds)
    service.use_orthanc_enums(orthanc_module)
    api.add_routes(service.routes())
    return service
