"""A real Orthanc (Debian package) with our real plugin and worker, on free ports in a temporary directory."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import requests

from inference.client import KeepAliveSession
from orthanc_plugin import launcher

REPO = Path(__file__).resolve().parents[2]
USER, PASSWORD = "tester", "integration-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})")


class OrthancServer:
    def __init__(self, root: Path, overrides: dict | None = None) -> None:
        self.root = root
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.overrides = {"StableAge": 2, "AI": {"LeaseSeconds": 6, "ReaperIntervalSeconds": 1}}
        for key, value in (overrides or {}).items():
            if key == "AI":
                self.overrides["AI"].update(value)
            else:
                self.overrides[key] = value
        self.session = KeepAliveSession()
        self.session.auth = (USER, PASSWORD)
        self.process: subprocess.Popen | None = None
        self.log_path = root / "orthanc.log"

    def start(self, *, wait: bool = True) -> "OrthancServer":
        cfg = launcher.build_config(self.root, http_port=self.http_port, dicom_port=self.dicom_port,
                                    bind="127.0.0.1", user=USER, password=PASSWORD, overrides=self.overrides)
        path = launcher.write_config(self.root, cfg)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(["Orthanc", str(path)], env=launcher.orthanc_environment(USER, PASSWORD),
                                            stdout=log, stderr=subprocess.STDOUT)
        if wait:
            wait_for(self._up, 30, "Orthanc to answer")
            wait_for(lambda: self.health()["worker"]["state"] in ("running", "disabled"), 30, "the worker")
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        try:
            return self.session.get(self.url + "/system", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for worker_log in sorted((self.root / "logs").glob("worker-*.log")):
            text += f"\n--- {worker_log.name}\n" + worker_log.read_text(errors="replace")
        return text

    # -- REST --------------------------------------------------------------------------------------
    def get(self, uri: str, **kw):
        r = self.session.get(self.url + uri, timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    def post(self, uri: str, body=None, **kw) -> requests.Response:
        return self.session.post(self.url + uri, json=body, timeout=60, **kw)

    def health(self) -> dict:
        return self.get("/ai/health")

    def jobs(self, **query) -> list[dict]:
        return self.get("/ai/jobs", params=query)["jobs"]

    def study_id(self, study_uid: str) -> str | None:
        hits = self.session.post(self.url + "/tools/lookup", data=study_uid, timeout=10).json()
        return next((h["ID"] for h in hits if h["Type"] == "Study"), None)

    def series_of_study(self, study_uid: str) -> list[dict]:
        sid = self.study_id(study_uid)
        return self.get(f"/studies/{sid}/series") if sid else []

    def wait_jobs(self, study_uid: str, n: int = 1, timeout: float = 120, terminal: bool = True) -> list[dict]:
        def ready():
            jobs = self.get(f"/ai/studies/{study_uid}/jobs")["jobs"]
            if len(jobs) < n:
                return None
            if terminal and any(j["state"] in ("pending", "queued", "running") for j in jobs):
                return None
            return jobs
        try:
            return wait_for(ready, timeout, f"{n} finished job(s) for study {study_uid}", interval=0.3)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()[-4000:]}") from None

    # -- DICOM ---------------------------------------------------------------------------------------
    def storescu(self, *paths: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
        cmd = ["storescu", "-aec", "ORTHANC", "-aet", "TESTSCU", "+sd", "+r", "127.0.0.1", str(self.dicom_port),
               *map(str, paths)]
        result = subprocess.run(cmd, env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True,
                                timeout=120)
        if expect_ok:
            assert result.returncode == 0, f"storescu failed: {result.stdout}\n{result.stderr}"
        return result


class PlainOrthanc:
    """A second, plugin-less Orthanc playing the hospital PACS (C-FIND/C-MOVE/C-STORE SCP)."""

    def __init__(self, root: Path, aet: str = "PACS", modalities: dict | None = None, dicomweb: bool = False) -> None:
        import json
        self.root, self.aet = root, aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        root.mkdir(parents=True, exist_ok=True)
        (root / "pacs.json").write_text(json.dumps({
            "Name": aet, "DicomAet": aet, "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [launcher.find_plugin("libOrthancDicomWeb.so")] if dicomweb else [],
            "DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True, "DicomModalities": modalities or {}}))
        self.process: subprocess.Popen | None = None

    def start(self) -> "PlainOrthanc":
        self.process = subprocess.Popen(["Orthanc", str(self.root / "pacs.json")], env={**os.environ, "TCP_NODELAY": "1"},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up():
            try:
                return requests.get(self.url + "/system", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        wait_for(up, 30, f"the {self.aet} Orthanc")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)

    def storescu(self, folder: Path) -> None:
        subprocess.run(["storescu", "-aec", self.aet, "+sd", "+r", "127.0.0.1", str(self.dicom_port), str(folder)],
                       env={**os.environ, "TCP_NODELAY": "1"}, check=True, capture_output=True, timeout=120)
