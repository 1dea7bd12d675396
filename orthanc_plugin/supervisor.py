"""Starts the local inference worker(s), restarts them when they die, and reclaims expired leases.

Workers are plain subprocesses of the venv's Python (``multiprocessing`` does not work inside Orthanc's
embedded interpreter). Each runs in its own session so a Ctrl-C on the terminal reaches Orthanc only;
Orthanc's shutdown stops them, and a worker exits by itself if Orthanc disappears.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from orthanc_plugin.jobs import JobStore

log = logging.getLogger("orthanc_ai.supervisor")


@dataclass
class WorkerProcess:
    worker_id: str
    role: str = "all"  # all | radiology | slides (``python -m inference --jobs``)
    process: subprocess.Popen | None = None
    state: str = "starting"  # starting | running | restarting | stopped
    restarts: int = 0
    consecutive_crashes: int = 0
    started_at: float = 0.0
    last_exit_code: int | None = None
    next_start: float = 0.0
    log_path: Path | None = None

    def describe(self) -> dict:
        return {"id": self.worker_id, "role": self.role, "state": self.state, "pid": self.process.pid if self.process else None,
                "restarts": self.restarts, "last_exit_code": self.last_exit_code,
                "uptime_seconds": round(time.time() - self.started_at, 1) if self.state == "running" else None}


@dataclass
class Supervisor:
    store: JobStore
    python: Path
    orthanc_url: str
    credentials: tuple[str, str] | None
    count: int
    log_directory: Path
    repo_root: Path
    threads: int = 2
    models_directories: tuple[Path, ...] = ()
    max_backoff: float = 30.0
    reaper_interval: float = 2.0
    #: one more worker for whole-slide jobs only (when pathology is enabled): a slide stage takes minutes and
    #: must not hold up the radiology queue, which the other workers then serve alone
    slide_worker: bool = False
    workers: list[WorkerProcess] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.log_directory.mkdir(parents=True, exist_ok=True)
        role = "radiology" if self.slide_worker else "all"
        self.workers = [WorkerProcess(f"local-{os.getpid()}-{i}", role) for i in range(self.count)]
        if self.slide_worker and self.count:
            self.workers.append(WorkerProcess(f"local-{os.getpid()}-slides", "slides"))
        self._thread = threading.Thread(target=self._run, name="ai-supervisor", daemon=True)
        self._thread.start()

    def _environment(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(self.threads), "TCP_NODELAY": "1", "LANG": "C.UTF-8",
               "HOME": os.environ.get("HOME", "/tmp")}
        for key in ("AI_DEVICE", "CUDA_VISIBLE_DEVICES", "TMPDIR"):
            if key in os.environ:
                env[key] = os.environ[key]
        if self.credentials:
            env["ORTHANC_AI_USER"], env["ORTHANC_AI_PASSWORD"] = self.credentials
        return env

    def _spawn(self, w: WorkerProcess) -> None:
        w.log_path = self.log_directory / f"worker-{w.worker_id.rsplit('-', 1)[-1]}.log"
        cmd = [str(self.python), "-m", "inference", "--orthanc", self.orthanc_url, "--worker-id", w.worker_id,
               "--parent-pid", str(os.getpid()), "--threads", str(self.threads), "--jobs", w.role]
        for d in self.models_directories:
            cmd += ["--models-dir", str(d)]
        with open(w.log_path, "ab") as out:
            w.process = subprocess.Popen(cmd, cwd=str(self.repo_root), env=self._environment(),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        w.state, w.started_at = "running", time.time()
        log.warning("inference worker %s (%s jobs) started (pid %d, log %s)", w.worker_id, w.role, w.process.pid,
                    w.log_path)

    def _run(self) -> None:
        last_reap = 0.0
        while not self._stopping.is_set():
            now = time.time()
            for w in self.workers:
                try:
                    self._watch(w, now)
                except Exception:
                    log.exception("supervising worker %s failed", w.worker_id)
            if now - last_reap >= self.reaper_interval:
                last_reap = now
                try:
                    for job in self.store.release_expired():
                        log.warning("job %s: lease expired, now %s", job["id"], job["state"])
                except Exception:
                    log.exception("lease reaper failed")
            self._stopping.wait(0.5)

    def _watch(self, w: WorkerProcess, now: float) -> None:
        if w.process is None:
            if now >= w.next_start:
                self._spawn(w)
            return
        code = w.process.poll()
        if code is None:
            return
        w.last_exit_code, w.process = code, None
        if self._stopping.is_set():
            return
        alive = now - w.started_at
        if alive > 60:  # it had been healthy: a one-off crash, not a crash loop
            w.consecutive_crashes = 0
        w.consecutive_crashes += 1
        backoff = min(self.max_backoff, 2.0 ** (w.consecutive_crashes - 1))
        w.restarts += 1
        w.state, w.next_start = "restarting", now + backoff
        log.error("inference worker %s exited with code %s after %.0f s; restarting in %.0f s (see %s)",
                  w.worker_id, code, alive, backoff, w.log_path)
        for job in self.store.release_worker(w.worker_id, f"worker exited with code {code}"):
            log.warning("job %s returned to the queue (now %s)", job["id"], job["state"])

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        for w in self.workers:
            if w.process and w.process.poll() is None:
                w.process.terminate()
        deadline = time.time() + timeout
        for w in self.workers:
            if w.process:
                try:
                    w.process.wait(max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    w.process.kill()
                w.last_exit_code = w.process.returncode
            w.state = "stopped"

    def describe(self) -> dict:
        running = sum(1 for w in self.workers if w.state == "running")
        state = "disabled" if not self.workers else ("running" if running == len(self.workers) else
                                                      "degraded" if running else "down")
        return {"worker": {"state": state, "processes": [w.describe() for w in self.workers]}}
