"""The inference worker: ``python -m inference --orthanc URL``.

Stateless: it claims a job over HTTP with a lease, renews the lease by heartbeat while it works (reporting
progress), and completes or fails the job. Several workers, on this machine or others, can share a queue.
Credentials come from $ORTHANC_AI_USER / $ORTHANC_AI_PASSWORD (never from the command line).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from inference import __version__
from inference.client import OrthancClient, OrthancUnavailable
from inference.heartbeat import LeaseHeartbeat
from inference.models.manifest import BUILTIN_MODELS_DIR, ModelManifest, load_manifests
from inference.models.registry import load_model
from inference.pipeline import JobCancelled, JobContext, JobSkipped, ReportSettings, run_segmentation
from inference.volume import VolumeError

log = logging.getLogger("inference.worker")


class ModelMismatch(Exception):
    """This worker's copy of a model is not the one the plugin approved: never run it."""


class Worker:
    #: which queues a worker serves: both (a worker on another machine), or one of them (the local supervisor
    #: runs whole-slide stages, which take minutes, in a worker of their own so radiology jobs never wait on one)
    ROLES = ("all", "radiology", "slides")

    def __init__(self, client: OrthancClient, worker_id: str, manifests: dict[str, ModelManifest], *,
                 poll_seconds: float = 1.0, parent_pid: int | None = None, role: str = "all") -> None:
        if role not in self.ROLES:
            raise ValueError(f"role must be one of {', '.join(self.ROLES)}, not {role!r}")
        self.role = role
        self.client = client
        self.worker_id = worker_id
        self.manifests = manifests
        self.poll_seconds = poll_seconds
        self.parent_pid = parent_pid
        self.stopping = threading.Event()
        self.long_poll = 2.0  # seconds the server may hold a claim open waiting for a job
        self._slides = None  # whole-slide jobs (inference/pathology/worker.py), set up on first use

    def claim(self) -> dict | None:
        r = self.client.post_json("/ai/worker/claim", {"worker": self.worker_id, "models": sorted(self.manifests),
                                                       "wait": self.long_poll}, timeout=self.long_poll + 30)
        if r.status_code == 204:
            return None
        if r.status_code != 200:
            raise OrthancUnavailable(f"claim refused: {r.status_code} {r.text[:200]}")
        return r.json()

    def run_forever(self, *, once: bool = False) -> None:
        if self.role == "slides":
            log.info("worker %s (version %s) serving whole-slide jobs", self.worker_id, __version__)
        else:
            log.info("worker %s (version %s) serving %s%s", self.worker_id, __version__,
                     ", ".join(sorted(self.manifests)), " and whole-slide jobs" if self.role == "all" else "")
        while not self.stopping.is_set():
            if self.parent_pid and os.getppid() != self.parent_pid:
                log.error("Orthanc (pid %d) is gone; stopping", self.parent_pid)
                return
            if self.role == "slides":
                if not self.poll_slides() and not once:
                    self.stopping.wait(self.poll_seconds)
                if once:
                    return
                continue
            try:
                claimed = self.claim()
            except OrthancUnavailable as exc:
                log.warning("%s; retrying", exc)
                self.stopping.wait(min(5.0, self.poll_seconds * 3))
                continue
            if claimed is None:
                if self.role == "all":
                    self.poll_slides()  # whole-slide jobs run when no radiology job waits
                if once:
                    return
                continue  # the claim itself waited (long poll)
            self.process(claimed)
            if once:
                return

    def poll_slides(self) -> bool:
        """Claim and run one whole-slide stage (``inference/pathology/worker.py``); False when none waits."""
        if self._slides is None:
            try:
                from inference.pathology.worker import SlideWorker
                self._slides = SlideWorker(self.client, self.worker_id)
            except ImportError as exc:  # the slide readers are optional for a radiology-only worker
                log.warning("whole-slide jobs disabled: %s", exc)
                self._slides = False
        return bool(self._slides) and self._slides.poll()

    def process(self, claimed: dict) -> None:
        job, lease = claimed["job"], claimed["lease"]
        job_id = job["id"]
        interval = max(1.0, float(claimed.get("lease_seconds", 30)) / 3)
        log.info("job %s: %s on series %s (attempt %d)", job_id, job["model_id"], job["orthanc_series_id"],
                 job["attempts"])
        outcome: dict = {}
        with LeaseHeartbeat(self.client, f"/ai/jobs/{job_id}/heartbeat", lease, interval,
                            parent_pid=self.parent_pid) as hb:
            ctx = JobContext(report=hb.report, cancelled=hb.cancel.is_set)
            try:
                manifest = self.manifests[job["model_id"]]
                expected = (claimed.get("model") or {}).get("sha256")
                if expected and manifest.sha256 and expected != manifest.sha256:
                    raise ModelMismatch(
                        f"the copy of model '{manifest.id}' on worker {self.worker_id} (sha256 {manifest.sha256[:12]}…) "
                        f"differs from the one Orthanc approved ({expected[:12]}…); install the same version on every worker")
                model = load_model(manifest)
                channels = job.get("inputs") or []  # multi-sequence models: [[name, series id], ...]
                series = [series_id for _, series_id in channels] if len(channels) > 1 else job["orthanc_series_id"]
                outputs = run_segmentation(self.client, series, model, ctx,
                                           min_slices=int(manifest.params.get("min_slices", 3)),
                                           report=ReportSettings.from_claim(claimed.get("settings")))
                outcome = {"path": "complete", "outputs": outputs}
            except JobCancelled:
                log.warning("job %s stopped: cancelled", job_id)
                return
            except JobSkipped as exc:
                outcome = {"path": "fail", "error": str(exc), "skipped": True}
            except VolumeError as exc:
                outcome = {"path": "fail", "error": str(exc), "retryable": False}
            except OrthancUnavailable as exc:
                outcome = {"path": "fail", "error": str(exc), "retryable": True}
            except Exception as exc:  # a bug or a broken model: fail visibly, keep the worker alive
                log.exception("job %s failed", job_id)
                outcome = {"path": "fail", "error": f"{type(exc).__name__}: {exc}", "retryable": False}
        path = outcome.pop("path")
        if path == "complete":
            outcome["timings"] = {k: round(v, 3) for k, v in ctx.timings.items()}
        log.info("job %s: %s %s (timings %s)", job_id, path, outcome.get("error", ""),
                 {k: round(v, 2) for k, v in ctx.timings.items()})
        self._report(job_id, path, {"lease": lease, "worker": self.worker_id, **outcome})

    def _report(self, job_id: str, path: str, body: dict) -> None:
        for attempt in range(10):  # the result is stored: try hard to say so
            try:
                r = self.client.post_json(f"/ai/jobs/{job_id}/{path}", body)
                if r.status_code == 409:
                    log.warning("job %s: %s refused (%s)", job_id, path, r.text[:200])
                return
            except OrthancUnavailable as exc:
                log.warning("could not report job %s (%s); retrying", job_id, exc)
                time.sleep(min(2 ** attempt, 10))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orthanc", required=True, help="Orthanc base URL, e.g. http://127.0.0.1:8042")
    parser.add_argument("--worker-id", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--models-dir", action="append", default=[], type=Path,
                        help="extra models directory (repeatable); built-in models are always available")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between claims when idle")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for numerical libraries")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (Orthanc) is gone")
    parser.add_argument("--once", action="store_true", help="process at most one job, then exit")
    parser.add_argument("--jobs", choices=Worker.ROLES, default="all",
                        help="which queues to serve: radiology jobs, whole-slide jobs, or both (default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    user, password = os.environ.get("ORTHANC_AI_USER"), os.environ.get("ORTHANC_AI_PASSWORD")
    client = OrthancClient(args.orthanc, (user, password) if user and password else None)
    # Approval is the plugin's: it queues jobs only for approved models, and every claim carries the
    # approved checksum, which this worker compares with its own copy before running anything.
    directories = [BUILTIN_MODELS_DIR, *args.models_dir]
    manifests = {m.id: m for m in load_manifests(directories, trusted=directories) if m.available}
    worker = Worker(client, args.worker_id, manifests, poll_seconds=args.poll, parent_pid=args.parent_pid,
                    role=args.jobs)

    def stop(*_: object) -> None:
        worker.stopping.set()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run_forever(once=args.once)
    return 0


if __name__ == "__main__":
    sys.exit(main())
