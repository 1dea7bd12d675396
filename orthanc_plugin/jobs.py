"""Job store and the job state machine: every transition of every job goes through this module.

States: ``pending → queued → running → done | failed | cancelled`` (plus ``skipped`` when the input is not
something the model handles). A running job holds a *lease* that its worker renews by heartbeat; a lease
that expires (worker killed, machine gone) sends the job back to the queue until ``max_attempts`` is
reached. The store is SQLite in WAL mode through sqlite-utils, behind :class:`JobStore`, so a store for a
shared database can replace it without touching callers.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import sqlite_utils

PENDING, QUEUED, RUNNING, DONE, FAILED, CANCELLED, SKIPPED = (
    "pending", "queued", "running", "done", "failed", "cancelled", "skipped")
STATES = (PENDING, QUEUED, RUNNING, DONE, FAILED, CANCELLED, SKIPPED)
TERMINAL = frozenset({DONE, FAILED, CANCELLED, SKIPPED})
ACTIVE = frozenset({PENDING, QUEUED, RUNNING})

#: The only legal transitions. ``running → queued`` is a retry after a lost worker or a transient error.
TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({QUEUED, CANCELLED, SKIPPED, FAILED}),  # failed: e.g. its model is unavailable
    QUEUED: frozenset({RUNNING, CANCELLED}),
    RUNNING: frozenset({DONE, FAILED, CANCELLED, SKIPPED, QUEUED}),
    DONE: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
    SKIPPED: frozenset(),
}


class JobError(Exception):
    """Base class; ``status`` is the HTTP status a route answers with."""

    status = 400


class JobNotFound(JobError):
    status = 404


class IllegalTransition(JobError):
    status = 409


class LeaseMismatch(JobError):
    """A worker reports on a job it no longer holds (its lease expired and the job moved on)."""

    status = 409


def check_transition(current: str, new: str) -> None:
    """Raise :class:`IllegalTransition` unless ``current → new`` is in :data:`TRANSITIONS`."""
    if current not in TRANSITIONS or new not in TRANSITIONS[current]:
        raise IllegalTransition(f"a job cannot go from '{current}' to '{new}'")


def _now_iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class NewJob:
    """What is needed to create a job: the study, the input series and the model."""

    study_instance_uid: str
    orthanc_study_id: str
    series_instance_uid: str
    orthanc_series_id: str
    model_id: str
    model_version: str
    input_fingerprint: str = ""
    trigger: str = "auto"  # auto (routing rule) | manual (REST)
    priority: int = 0
    destinations: tuple[str, ...] = ()  # where results are forwarded (names of AI.Destinations)
    inputs: tuple[tuple[str, str], ...] = ()  # multi-sequence models: (channel name, Orthanc series id), in order


JOB_COLUMNS = {
    "id": str, "study_instance_uid": str, "orthanc_study_id": str, "series_instance_uid": str,
    "orthanc_series_id": str, "model_id": str, "model_version": str, "input_fingerprint": str,
    "trigger": str, "priority": int, "destinations": str, "state": str, "progress": float, "message": str,
    "attempts": int, "max_attempts": int, "error": str, "outputs": str, "worker": str,
    "lease_token": str, "lease_expires": float, "created_at": str, "updated_at": str,
    "queued_at": float, "started_at": float, "finished_at": float, "timings": str,
    "inputs": str,
}


class JobStore:
    """SQLite-backed jobs and audit trail. Thread-safe: Orthanc calls us from many threads."""

    def __init__(self, path: Path | str, *, max_attempts: int = 3, lease_seconds: float = 30.0,
                 on_transition: Callable[[dict, str, str, str], None] | None = None) -> None:
        self.path = str(path)
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self._on_transition = on_transition
        self._queued = threading.Condition()  # notified whenever a job becomes claimable
        self._lock = threading.RLock()
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    @property
    def lock(self) -> threading.RLock:
        """Hold it to make a check and a create one step (two threads routing the same study)."""
        return self._lock

    # -- schema --------------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self._lock:
            if "jobs" not in self.db.table_names():
                self.db["jobs"].create(JOB_COLUMNS, pk="id", not_null={"state", "model_id"},
                                       defaults={"progress": 0.0, "attempts": 0, "outputs": "[]",
                                                 "error": "", "message": "", "priority": 0})
                self.db["jobs"].create_index(["state", "priority", "queued_at"])
                self.db["jobs"].create_index(["study_instance_uid"])
                self.db["jobs"].create_index(["series_instance_uid", "model_id"])
            missing = {k: v for k, v in JOB_COLUMNS.items() if k not in self.db["jobs"].columns_dict}
            for column, kind in missing.items():  # a store written by an older version
                self.db["jobs"].add_column(column, kind)
            if "settings" not in self.db.table_names():
                self.db["settings"].create({"key": str, "value": str}, pk="key")
            if "audit" not in self.db.table_names():
                self.db["audit"].create({"id": int, "ts": str, "job_id": str, "study_instance_uid": str,
                                         "event": str, "from_state": str, "to_state": str,
                                         "actor": str, "detail": str}, pk="id")
                self.db["audit"].create_index(["job_id"])

    # -- reading -------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict:
        with self._lock:
            try:
                return self._decode(self.db["jobs"].get(job_id))
            except sqlite_utils.db.NotFoundError:
                raise JobNotFound(f"no job with id '{job_id}'") from None

    def list(self, *, state: str | None = None, study_instance_uid: str | None = None,
             limit: int = 100, offset: int = 0) -> list[dict]:
        where, params = [], []
        if state:
            if state not in STATES:
                raise JobError(f"unknown state '{state}'; expected one of {', '.join(STATES)}")
            where.append("state = ?")
            params.append(state)
        if study_instance_uid:
            where.append("study_instance_uid = ?")
            params.append(study_instance_uid)
        with self._lock:
            rows = self.db["jobs"].rows_where(" and ".join(where) or None, params,
                                              order_by="created_at desc, rowid desc",
                                              limit=limit, offset=offset)
            return [self._decode(r) for r in rows]

    def find(self, *, series_instance_uid: str, model_id: str, model_version: str,
             input_fingerprint: str | None = None, states: Iterable[str] | None = None) -> list[dict]:
        where = "series_instance_uid = ? and model_id = ? and model_version = ?"
        params: list[Any] = [series_instance_uid, model_id, model_version]
        if input_fingerprint is not None:
            where += " and input_fingerprint = ?"
            params.append(input_fingerprint)
        if states is not None:
            states = list(states)
            where += f" and state in ({','.join('?' * len(states))})"
            params.extend(states)
        with self._lock:
            return [self._decode(r) for r in self.db["jobs"].rows_where(where, params, order_by="created_at")]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self.db.execute("select state, count(*) from jobs group by state").fetchall()
        out = {s: 0 for s in STATES}
        out.update(dict(rows))
        return out

    def queue_position(self, job: dict) -> int | None:
        """0-based place among queued jobs (None unless the job is queued)."""
        if job["state"] != QUEUED:
            return None
        with self._lock:
            (n,) = self.db.execute(
                "select count(*) from jobs where state = 'queued' and "
                "(priority > ? or (priority = ? and queued_at < ?))",
                [job["priority"], job["priority"], job["queued_at"]]).fetchone()
        return int(n)

    def recent_durations(self, model_id: str, n: int = 10) -> list[float]:
        with self._lock:
            rows = self.db.execute(
                "select finished_at - started_at from jobs where model_id = ? and state = 'done' "
                "and started_at is not null and finished_at is not null order by finished_at desc limit ?",
                [model_id, n]).fetchall()
        return [float(r[0]) for r in rows if r[0] is not None and r[0] >= 0]

    def eta_seconds(self, job: dict, now: float | None = None) -> float | None:
        """Seconds until the job should be done, from the model's recent run times; None if unknown."""
        durations = self.recent_durations(job["model_id"])
        if not durations or job["state"] in TERMINAL:
            return None
        typical = statistics.median(durations)
        now = time.time() if now is None else now
        if job["state"] == RUNNING:
            elapsed = now - (job["started_at"] or now)
            return max(typical - elapsed, typical * (1 - (job["progress"] or 0.0)) * 0.1, 0.0)
        ahead = self.queue_position(job) or 0
        running = self.counts()[RUNNING]
        return typical * (ahead + 1 + (1 if running else 0) * 0.5)

    def audit(self, job_id: str | None = None, limit: int = 200) -> list[dict]:
        with self._lock:
            if job_id:
                return list(self.db["audit"].rows_where("job_id = ?", [job_id], order_by="id", limit=limit))
            return list(self.db["audit"].rows_where(order_by="id desc", limit=limit))

    def setting(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            try:
                return self.db["settings"].get(key)["value"]
            except sqlite_utils.db.NotFoundError:
                return default

    def set_setting(self, key: str, value: str) -> None:
        with self._lock:
            self.db["settings"].upsert({"key": key, "value": value}, pk="key")

    # -- writing -------------------------------------------------------------------------------
    def create(self, new: NewJob, *, actor: str = "system") -> dict:
        """Record a job in ``pending``; :meth:`enqueue` makes it claimable."""
        now = time.time()
        row = {**new.__dict__, "destinations": json.dumps(list(new.destinations)),
               "inputs": json.dumps([list(pair) for pair in new.inputs]), "id": uuid.uuid4().hex, "state": PENDING, "progress": 0.0, "attempts": 0,
               "max_attempts": self.max_attempts, "error": "", "message": "", "outputs": "[]",
               "worker": None, "lease_token": None, "lease_expires": None,
               "created_at": _now_iso(now), "updated_at": _now_iso(now),
               "queued_at": None, "started_at": None, "finished_at": None}
        with self._lock:
            self.db["jobs"].insert(row)
            self._log(row, "created", None, PENDING, actor, f"trigger={new.trigger}")
        return self._decode(row)

    def enqueue(self, job_id: str, *, actor: str = "system") -> dict:
        return self._transition(job_id, QUEUED, actor=actor, queued_at=time.time())

    def skip(self, job_id: str, reason: str, *, actor: str = "system", lease_token: str | None = None) -> dict:
        return self._transition(job_id, SKIPPED, actor=actor, error=reason, require_lease=lease_token,
                                finished_at=time.time(), progress=1.0)

    def reject(self, job_id: str, error: str, *, actor: str = "system") -> dict:
        """Fail a job before it is queued (its model is unavailable, say): never claimed, never retried."""
        return self._transition(job_id, FAILED, actor=actor, error=error, finished_at=time.time())

    def cancel(self, job_id: str, *, actor: str = "user", reason: str = "cancelled by a user") -> dict:
        return self._transition(job_id, CANCELLED, actor=actor, error=reason, finished_at=time.time())

    def claim(self, worker: str, *, models: Iterable[str] | None = None,
              min_priority: int | None = None) -> dict | None:
        """Give the next queued job to ``worker`` with a fresh lease, or None when the queue is empty
        (or holds only jobs below ``min_priority``, which wait: back-pressure, off-peak hours)."""
        where, params = "state = 'queued'", []
        if min_priority is not None:
            where += f" and priority >= {int(min_priority)}"
        if models is not None:
            models = list(models)
            if not models:
                return None
            where += f" and model_id in ({','.join('?' * len(models))})"
            params = list(models)
        with self._lock:
            rows = list(self.db["jobs"].rows_where(where, params, order_by="priority desc, queued_at, rowid",
                                                   limit=1))
            if not rows:
                return None
            job = rows[0]
            now = time.time()
            return self._transition(job["id"], RUNNING, actor=worker, worker=worker,
                                    lease_token=secrets.token_hex(16), lease_expires=now + self.lease_seconds,
                                    attempts=job["attempts"] + 1, started_at=now, progress=0.0,
                                    message="", error="")

    def wait_for_queued(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds until some job is queued (long-polling claims)."""
        with self._queued:
            self._queued.wait(timeout)

    def heartbeat(self, job_id: str, lease_token: str, *, progress: float | None = None,
                  message: str | None = None) -> dict:
        """Renew the lease and record progress. A cancelled job is returned as is (the worker stops)."""
        with self._lock:
            job = self.get(job_id)
            if job["state"] == CANCELLED and job["lease_token"] == lease_token:
                return job
            self._check_lease(job, lease_token)
            changes: dict[str, Any] = {"lease_expires": time.time() + self.lease_seconds,
                                       "updated_at": _now_iso()}
            if progress is not None:
                changes["progress"] = min(max(float(progress), 0.0), 1.0)
            if message is not None:
                changes["message"] = str(message)[:500]
            self.db["jobs"].update(job_id, changes)
            return self.get(job_id)

    def complete(self, job_id: str, lease_token: str, outputs: list[str], *, actor: str = "worker",
                 timings: dict[str, float] | None = None) -> dict:
        return self._transition(job_id, DONE, actor=actor, require_lease=lease_token,
                                outputs=json.dumps(list(outputs)), progress=1.0, finished_at=time.time(),
                                error="", timings=json.dumps(timings or {}))

    def fail(self, job_id: str, lease_token: str, error: str, *, retryable: bool = False,
             actor: str = "worker") -> dict:
        """Fail a running job; a retryable error with attempts left sends it back to the queue."""
        with self._lock:
            job = self.get(job_id)
            self._check_lease(job, lease_token)
            if retryable and job["attempts"] < job["max_attempts"]:
                return self._transition(job_id, QUEUED, actor=actor, error=error, queued_at=time.time(),
                                        lease_token=None, lease_expires=None, worker=None)
            return self._transition(job_id, FAILED, actor=actor, error=error, finished_at=time.time())

    def release_expired(self, now: float | None = None) -> list[dict]:
        """Send running jobs whose lease expired back to the queue (or fail them after the last attempt)."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [r["id"] for r in self.db["jobs"].rows_where(
                "state = 'running' and lease_expires < ?", [now])]
            return [self._release(job_id, "its worker stopped answering (lease expired)") for job_id in expired]

    def release_worker(self, worker: str, reason: str) -> list[dict]:
        """Requeue the running jobs of a worker known to be dead (faster than waiting for the lease)."""
        with self._lock:
            held = [r["id"] for r in self.db["jobs"].rows_where("state = 'running' and worker = ?", [worker])]
            return [self._release(job_id, reason) for job_id in held]

    def _release(self, job_id: str, reason: str) -> dict:
        job = self.get(job_id)
        if job["attempts"] < job["max_attempts"]:
            return self._transition(job_id, QUEUED, actor="supervisor", error=f"retrying: {reason}",
                                    queued_at=time.time(), lease_token=None, lease_expires=None, worker=None)
        return self._transition(job_id, FAILED, actor="supervisor", finished_at=time.time(),
                                error=f"gave up after {job['attempts']} attempts: {reason}")

    def _check_lease(self, job: dict, lease_token: str | None) -> None:
        if job["state"] != RUNNING or not lease_token or job["lease_token"] != lease_token:
            raise LeaseMismatch(f"job {job['id']} is '{job['state']}' and no longer held by this lease")

    def _transition(self, job_id: str, new_state: str, *, actor: str, require_lease: str | None = None,
                    **changes: Any) -> dict:
        """Apply one legal transition (optionally only for the holder of ``require_lease``) and audit it."""
        with self._lock:
            job = self.get(job_id)
            check_transition(job["state"], new_state)
            if require_lease is not None:
                self._check_lease(job, require_lease)
            changes.update(state=new_state, updated_at=_now_iso())
            if new_state in TERMINAL:
                changes.setdefault("lease_expires", None)
            self.db["jobs"].update(job_id, changes)
            detail = changes.get("error") or changes.get("worker") or ""
            self._log(job, "transition", job["state"], new_state, actor, detail)
            updated = self.get(job_id)
        if new_state == QUEUED:
            with self._queued:
                self._queued.notify_all()
        if self._on_transition:
            self._on_transition(updated, job["state"], new_state, actor)
        return updated

    def audit_event(self, event: str, *, study_instance_uid: str, actor: str, detail: str = "") -> None:
        """An audit entry that is not a job transition (a study deleted by a user, say)."""
        with self._lock:
            self.db["audit"].insert({"ts": _now_iso(), "job_id": None, "study_instance_uid": study_instance_uid,
                                     "event": event, "from_state": None, "to_state": None, "actor": actor,
                                     "detail": detail[:1000]})

    def _log(self, job: dict, event: str, old: str | None, new: str, actor: str, detail: str) -> None:
        self.db["audit"].insert({"ts": _now_iso(), "job_id": job["id"],
                                 "study_instance_uid": job["study_instance_uid"], "event": event,
                                 "from_state": old, "to_state": new, "actor": actor, "detail": detail[:1000]})

    @staticmethod
    def _decode(row: dict) -> dict:
        row = dict(row)
        row["outputs"] = json.loads(row.get("outputs") or "[]")
        row["destinations"] = json.loads(row.get("destinations") or "[]")
        row["timings"] = json.loads(row.get("timings") or "{}")
        row["inputs"] = json.loads(row.get("inputs") or "[]")
        return row

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()


def public_view(store: JobStore, job: dict) -> dict:
    """The job as the REST API shows it: no lease token, times as ISO strings, queue position and ETA."""
    out = {k: v for k, v in job.items() if k not in ("lease_token", "lease_expires", "queued_at",
                                                       "started_at", "finished_at")}
    for key in ("queued_at", "started_at", "finished_at"):
        out[key] = _now_iso(job[key]) if job.get(key) else None
    out["queue_position"] = store.queue_position(job)
    out["eta_seconds"] = store.eta_seconds(job)
    return out
