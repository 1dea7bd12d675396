"""Durable outbox: results are forwarded to PACS peers even when a peer is down for hours.

Each (job, destination) pair is a row in the job store's database. A forwarder thread sends due rows
through Orthanc's own machinery (``/modalities/{m}/store`` C-STORE, ``/peers/{p}/store``, DICOMweb
``/dicom-web/servers/{s}/stow``); a failure schedules the next attempt with exponential backoff and jitter;
a row older than the maximum age goes to ``dead`` (visible in ``GET /ai/outbox``, re-queued by
``POST /ai/outbox/{id}/retry``). Nothing is deleted: delivered rows are the forwarding audit trail.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from orthanc_plugin.config import Destination
from orthanc_plugin.jobs import JobError, JobNotFound, JobStore, _now_iso

log = logging.getLogger("orthanc_ai.outbox")

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"


@dataclass(frozen=True)
class Backoff:
    initial: float = 5.0
    maximum: float = 600.0
    max_age: float = 86400.0

    def delay(self, attempts: int, rng: random.Random = random.Random()) -> float:
        """Exponential backoff with full jitter between half and all of the nominal delay."""
        nominal = min(self.maximum, self.initial * 2 ** max(attempts - 1, 0))
        return nominal * (0.5 + 0.5 * rng.random())


Sender = Callable[[Destination, list[str]], None]  # raises on failure
Resolver = Callable[[list[str]], list[str]]        # SOP Instance UIDs -> Orthanc instance ids


class Outbox:
    def __init__(self, store: JobStore, destinations: dict[str, Destination], send: Sender, resolve: Resolver,
                 backoff: Backoff = Backoff()) -> None:
        self.store = store
        self.db = store.db
        self._lock = store._lock
        self.destinations = destinations
        self.send = send
        self.resolve = resolve
        self.backoff = backoff
        self._wake = threading.Event()
        self._stop = threading.Event()
        with self._lock:
            if "outbox" not in self.db.table_names():
                self.db["outbox"].create({
                    "id": int, "job_id": str, "study_instance_uid": str, "destination": str,
                    "sop_instance_uids": str, "state": str, "attempts": int, "created_at": float,
                    "next_attempt_at": float, "delivered_at": float, "last_error": str, "updated_at": str,
                }, pk="id", defaults={"attempts": 0, "last_error": ""})
                self.db["outbox"].create_index(["state", "next_attempt_at"])

    # -- producing ---------------------------------------------------------------------------------
    def enqueue_job(self, job: dict) -> list[int]:
        """One row per destination of a completed job (no-op without destinations or outputs)."""
        ids = []
        for name in job.get("destinations") or []:
            if name not in self.destinations:
                log.error("job %s names destination '%s', which is no longer configured", job["id"], name)
                continue
            if job.get("outputs"):
                ids.append(self._insert(job["id"], job["study_instance_uid"], name, job["outputs"]))
        if ids:
            self._wake.set()
        return ids

    def _insert(self, job_id: str, study_uid: str, destination: str, uids: Iterable[str]) -> int:
        now = time.time()
        with self._lock:
            return self.db["outbox"].insert({
                "job_id": job_id, "study_instance_uid": study_uid, "destination": destination,
                "sop_instance_uids": json.dumps(list(uids)), "state": PENDING, "attempts": 0, "created_at": now,
                "next_attempt_at": now, "delivered_at": None, "last_error": "", "updated_at": _now_iso(now),
            }).last_pk

    # -- reading / operator actions ----------------------------------------------------------------------
    def get(self, item_id: int) -> dict:
        with self._lock:
            rows = list(self.db["outbox"].rows_where("id = ?", [item_id]))
        if not rows:
            raise JobNotFound(f"no outbox item {item_id}")
        return self._decode(rows[0])

    def list(self, *, state: str | None = None, limit: int = 100) -> list[dict]:
        if state and state not in (PENDING, DELIVERED, DEAD):
            raise JobError(f"unknown outbox state '{state}'; expected pending, delivered or dead")
        with self._lock:
            rows = self.db["outbox"].rows_where("state = ?" if state else None, [state] if state else [],
                                                order_by="id desc", limit=limit)
            return [self._decode(r) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """{destination: {state: count}}"""
        with self._lock:
            rows = self.db.execute("select destination, state, count(*) from outbox group by destination, state").fetchall()
        out: dict[str, dict[str, int]] = {name: {PENDING: 0, DELIVERED: 0, DEAD: 0} for name in self.destinations}
        for dest, state, n in rows:
            out.setdefault(dest, {PENDING: 0, DELIVERED: 0, DEAD: 0})[state] = n
        return out

    def retry(self, item_id: int) -> dict:
        """Re-queue a dead (or pending) item now, with a fresh maximum age."""
        item = self.get(item_id)
        if item["state"] == DELIVERED:
            raise JobError(f"outbox item {item_id} was already delivered")
        now = time.time()
        with self._lock:
            self.db["outbox"].update(item_id, {"state": PENDING, "next_attempt_at": now, "created_at": now,
                                               "updated_at": _now_iso(now)})
        self._wake.set()
        return self.get(item_id)

    # -- forwarding ----------------------------------------------------------------------------------
    def due(self, now: float, limit: int = 20) -> list[dict]:
        with self._lock:
            return [self._decode(r) for r in self.db["outbox"].rows_where(
                "state = 'pending' and next_attempt_at <= ?", [now], order_by="next_attempt_at", limit=limit)]

    def attempt(self, item: dict, now: float | None = None) -> dict:
        """Try to deliver one item; record the outcome."""
        now = time.time() if now is None else now
        destination = self.destinations.get(item["destination"])
        try:
            if destination is None:
                raise RuntimeError(f"destination '{item['destination']}' is no longer configured")
            resources = self.resolve(item["sop_instance_uids"])
            if not resources:
                raise RuntimeError("the results are no longer in Orthanc")
            self.send(destination, resources)
        except Exception as exc:  # any failure is retried until the maximum age
            attempts = item["attempts"] + 1
            error = f"{type(exc).__name__}: {exc}"[:500]
            if now - item["created_at"] >= self.backoff.max_age:
                changes = {"state": DEAD, "attempts": attempts, "last_error": error}
                log.error("outbox %d to %s: giving up after %d attempts (%s)", item["id"], item["destination"],
                          attempts, error)
            else:
                changes = {"attempts": attempts, "last_error": error,
                           "next_attempt_at": now + self.backoff.delay(attempts)}
                log.warning("outbox %d to %s failed (attempt %d): %s", item["id"], item["destination"], attempts, error)
        else:
            changes = {"state": DELIVERED, "attempts": item["attempts"] + 1, "delivered_at": now, "last_error": ""}
            log.info("outbox %d delivered to %s", item["id"], item["destination"])
        changes["updated_at"] = _now_iso(now)
        with self._lock:
            self.db["outbox"].update(item["id"], changes)
        return self.get(item["id"])

    def run_once(self, now: float | None = None) -> int:
        items = self.due(time.time() if now is None else now)
        for item in items:
            self.attempt(item, now)
        return len(items)

    def start(self) -> None:
        threading.Thread(target=self._run, name="ai-outbox", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("outbox forwarder failed")
            self._wake.wait(1.0)
            self._wake.clear()

    @staticmethod
    def _decode(row: dict) -> dict:
        row = dict(row)
        row["sop_instance_uids"] = json.loads(row.get("sop_instance_uids") or "[]")
        return row

    def view(self, item: dict) -> dict:
        out = dict(item)
        for key in ("created_at", "next_attempt_at", "delivered_at"):
            out[key] = _now_iso(item[key]) if item.get(key) else None
        return out

    def routes(self) -> list[tuple[str, str, Callable]]:
        def list_items(request):
            return 200, {"items": [self.view(i) for i in self.list(state=request.query.get("state"))],
                         "counts": self.counts()}

        def retry_item(request, item_id):
            return 200, self.view(self.retry(int(item_id)))

        return [("GET", r"outbox", list_items), ("POST", r"outbox/([0-9]+)/retry", retry_item)]
