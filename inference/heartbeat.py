"""Lease renewal for a claimed job or slide stage: a background thread that posts progress to the plugin."""

from __future__ import annotations

import logging
import os
import threading

from inference.client import OrthancClient, OrthancUnavailable

log = logging.getLogger("inference.heartbeat")


class LeaseHeartbeat:
    """Posts ``{"lease", "progress", "message"}`` to ``uri`` every ``interval`` seconds while the work runs.

    ``cancel`` is set when the plugin says the work is no longer this worker's: an answer with ``"cancel":
    true`` (cancelled by a user), 409 (the lease was reassigned) or 404 (deleted); beating then stops. With
    ``parent_pid``, the whole worker exits when that process (Orthanc) is gone.
    """

    #: answers that mean "stop": the work was deleted (404) or given to another worker (409)
    LOST = (404, 409)

    def __init__(self, client: OrthancClient, uri: str, lease: str, interval: float, *,
                 parent_pid: int | None = None, name: str = "heartbeat") -> None:
        self.client, self.uri, self.lease, self.interval = client, uri, lease, interval
        self.parent_pid = parent_pid
        self.progress, self.message = 0.0, ""
        self.cancel = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> "LeaseHeartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def report(self, progress: float, message: str) -> None:
        self.progress, self.message = progress, message

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.parent_pid and os.getppid() != self.parent_pid:
                log.error("Orthanc (pid %d) is gone; stopping", self.parent_pid)
                os._exit(3)
            if not self.beat():
                return

    def beat(self) -> bool:
        """One renewal; False once the work is lost (no more beats)."""
        try:
            r = self.client.post_json(self.uri, {"lease": self.lease, "progress": self.progress,
                                                 "message": self.message}, timeout=10)
        except OrthancUnavailable as exc:
            log.warning("heartbeat failed: %s", exc)
            return True
        if r.status_code in self.LOST or (r.status_code == 200 and r.json().get("cancel")):
            log.warning("%s: cancelled, deleted or reassigned; stopping the work", self.uri)
            self.cancel.set()
            return False
        return True
