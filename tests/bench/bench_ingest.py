"""Benchmarks (``make bench``): not timed tests, figures for the README.

1. C-STORE throughput of the same 500 instances into bare Orthanc vs Orthanc with our plugin (and
   DICOMweb, as deployed): runs interleaved, fresh server each run, median of 5 → the ratio.
2. For one brain series: end of C-STORE → job created (stable), job created → running, running → SEG stored.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.integration.harness import PASSWORD, USER, OrthancServer, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("AI_SHARED_DATA", REPO.parent / "shared" / "data"))


def make_instances(out: Path, n_series: int = 5, per_series: int = 100) -> Path:
    template = pydicom.dcmread(SHARED / "mr" / "MR_small.dcm")
    out.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    for s in range(n_series):
        series = generate_uid()
        for k in range(per_series):
            ds = copy.deepcopy(template)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber, ds.SeriesNumber = k + 1, s + 1
            ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
            ds.save_as(out / f"{s}_{k:03d}.dcm", enforce_file_format=True)
    return out


def storescu_seconds(dicom_port: int, folder: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aec", "ORTHANC", "+sd", "127.0.0.1", str(dicom_port), str(folder)],
                   env={**os.environ, "TCP_NODELAY": "1"}, check=True, capture_output=True)
    return time.perf_counter() - t0


def bare_orthanc(root: Path) -> tuple[subprocess.Popen, int]:
    http, dicom = free_port(), free_port()
    cfg = {"Name": "bare", "StorageDirectory": str(root / "s"), "IndexDirectory": str(root / "s"),
           "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
           "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "Plugins": []}
    (root / "bare.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(["Orthanc", str(root / "bare.json")], env={**os.environ, "TCP_NODELAY": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import requests
    wait_for(lambda: _ok(requests, f"http://127.0.0.1:{http}/system"), 30, "bare Orthanc")
    return proc, dicom


def _ok(requests, url: str) -> bool:
    try:
        return requests.get(url, auth=(USER, PASSWORD), timeout=2).status_code == 200
    except requests.RequestException:
        return False


def bench_ingest(runs: int = 5) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = make_instances(Path(tmp) / "data")
        n = len(list(data.iterdir()))
        bare, plugin = [], []
        for i in range(runs):
            with tempfile.TemporaryDirectory() as d:
                proc, port = bare_orthanc(Path(d))
                try:
                    bare.append(storescu_seconds(port, data))
                finally:
                    proc.terminate(); proc.wait()
            with tempfile.TemporaryDirectory() as d:
                server = OrthancServer(Path(d), overrides={"StableAge": 60}).start()
                try:
                    plugin.append(storescu_seconds(server.dicom_port, data))
                finally:
                    server.stop()
            print(f"  run {i + 1}: bare {bare[-1]:.2f} s, plugin {plugin[-1]:.2f} s", flush=True)
    mb, mp = statistics.median(bare), statistics.median(plugin)
    return {"instances": n, "runs": runs, "bare_seconds": bare, "plugin_seconds": plugin,
            "bare_median_inst_per_s": round(n / mb, 1), "plugin_median_inst_per_s": round(n / mp, 1),
            "plugin_over_bare_throughput": round(mb / mp, 3)}


def bench_latency(repeats: int = 3) -> dict:
    series = SHARED / "mr_brain" / "siemens_t1_fl2d_sag_HFS"
    study = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    rows = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            server = OrthancServer(Path(d)).start()
            try:
                time.sleep(1.0)  # let the worker finish importing before the clock starts
                storescu_seconds(server.dicom_port, series)
                t_sent = time.time()  # end of the C-STORE association
                job = server.wait_jobs(study, timeout=300)[0]
                full = server.get(f"/ai/jobs/{job['id']}")
                created = datetime.fromisoformat(full["created_at"]).timestamp()
                started = datetime.fromisoformat(full["started_at"]).timestamp()
                finished = datetime.fromisoformat(full["finished_at"]).timestamp()
                rows.append({"sent_to_job_created_s": round(created - t_sent, 2),
                             "created_to_running_s": round(started - created, 3),
                             "running_to_seg_stored_s": round(finished - started, 2), "state": full["state"]})
                print(f"  latency: {rows[-1]}", flush=True)
            finally:
                server.stop()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "state"}
    return {"stable_age_s": 2, "runs": rows, "median": med}


def main() -> int:
    if not SHARED.is_dir():
        print(f"shared data not found at {SHARED}; set AI_SHARED_DATA", file=sys.stderr)
        return 2
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()}
    print("C-STORE throughput, bare Orthanc vs Orthanc + AI plugin (interleaved):", flush=True)
    ingest = bench_ingest()
    print(json.dumps(ingest, indent=2))
    print("Brain MR job latency (StableAge 2 s):", flush=True)
    latency = bench_latency()
    print(json.dumps(latency, indent=2))
    out = REPO / "var" / "bench-results.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "ingest": ingest, "latency": latency}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
