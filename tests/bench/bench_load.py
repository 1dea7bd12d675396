"""Load benchmark (``make bench``): N studies sent at once by several storescu associations.

Reports whether every study was processed, the time for the queue to drain, throughput (studies/min),
the distribution of "job created → done" and "running → done", and the RSS of Orthanc and the worker over
the run (sampled every 0.5 s) to show that memory stays flat. Run:
``python -m tests.bench.bench_load [N] [associations]`` (defaults 20 studies, 4 associations).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pydicom

from tests.bench.bench_ingest import SHARED
from tests.integration.harness import OrthancServer
from tests.integration.test_fault_tolerance import brain_copy


def rss_mb(pid: int | None) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        return None
    return None


def main(n: int = 20, associations: int = 4) -> int:
    brain = [pydicom.dcmread(p) for p in sorted((SHARED / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm"))]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        studies = [brain_copy(brain, root / "in" / f"group{i % associations}" / f"s{i}", patient=f"LOAD-{i}")
                   for i in range(n)]
        server = OrthancServer(root / "orthanc", overrides={"StableAge": 3}).start()
        samples: list[tuple[float, float | None, float | None]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                worker = server.health()["worker"]["processes"][0]["pid"]
                samples.append((time.time(), rss_mb(server.process.pid), rss_mb(worker)))
                stop.wait(0.5)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            t0 = time.time()
            senders = [subprocess.Popen(["storescu", "-aec", "ORTHANC", "+sd", "+r", "127.0.0.1",
                                         str(server.dicom_port), str(root / "in" / f"group{g}")],
                                        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})
                       for g in range(associations)]
            for p in senders:
                p.wait()
            t_sent = time.time()
            jobs = [server.wait_jobs(s, timeout=1800)[0] for s in studies]
            t_done = time.time()
        finally:
            stop.set()
            sampler.join()
            server.stop()

    def ts(value: str) -> float:
        return datetime.fromisoformat(value).timestamp()
    created_to_done = [ts(j["finished_at"]) - ts(j["created_at"]) for j in jobs if j["finished_at"]]
    running_to_done = [ts(j["finished_at"]) - ts(j["started_at"]) for j in jobs if j["started_at"] and j["finished_at"]]
    orthanc_rss = [o for _, o, _ in samples if o]
    worker_rss = [w for _, _, w in samples if w]
    q = statistics.quantiles(created_to_done, n=10) if len(created_to_done) >= 2 else created_to_done
    result = {
        "studies": n, "associations": associations, "instances_per_study": len(brain),
        "states": {s: sum(j["state"] == s for j in jobs) for s in sorted({j["state"] for j in jobs})},
        "send_seconds": round(t_sent - t0, 1), "drain_seconds_after_send": round(t_done - t_sent, 1),
        "studies_per_minute": round(60 * n / (t_done - t0), 1),
        "created_to_done_s": {"median": round(statistics.median(created_to_done), 1),
                              "p10": round(q[0], 1), "p90": round(q[-1], 1), "max": round(max(created_to_done), 1)},
        "running_to_done_s_median": round(statistics.median(running_to_done), 2),
        "orthanc_rss_mb": {"first": round(orthanc_rss[0]), "max": round(max(orthanc_rss)), "last": round(orthanc_rss[-1])},
        "worker_rss_mb": {"first": round(worker_rss[0]), "max": round(max(worker_rss)), "last": round(worker_rss[-1])},
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parents[2] / "var" / "bench-load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:3])))
