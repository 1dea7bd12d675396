"""``GET /ai/metrics``: Prometheus text exposition, so a site's Prometheus/Grafana can watch the AI.

Histograms are computed from the job store at scrape time over all finished jobs (jobs are never deleted,
so bucket counts only grow, as Prometheus expects of counters).
"""

from __future__ import annotations

import json
from typing import Callable

from orthanc_plugin.jobs import STATES, JobStore
from orthanc_plugin.routes import RawBody

BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
PROMETHEUS_TEXT = "text/plain; version=0.0.4"


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {value:g}")

    def histogram(self, name: str, values: list[float], **labels: str) -> None:
        for bound in BUCKETS:
            self.sample(f"{name}_bucket", sum(1 for v in values if v <= bound), **labels, le=f"{bound:g}")
        self.sample(f"{name}_bucket", len(values), **labels, le="+Inf")
        self.sample(f"{name}_sum", round(sum(values), 3), **labels)
        self.sample(f"{name}_count", len(values), **labels)


def render(store: JobStore, health: Callable[[], dict]) -> str:
    out = _Text()
    with store._lock:
        by_state = store.db.execute("select state, model_id, count(*) from jobs group by state, model_id").fetchall()
        finished = store.db.execute(
            "select model_id, queued_at, started_at, finished_at, timings from jobs "
            "where state = 'done' and started_at is not null and finished_at is not null").fetchall()
    out.family("orthanc_ai_jobs", "gauge", "Jobs by state and model.")
    models = sorted({m for _, m, _ in by_state})
    counts = {(s, m): n for s, m, n in by_state}
    for model in models:
        for state in STATES:
            out.sample("orthanc_ai_jobs", counts.get((state, model), 0), state=state, model=model)
    out.family("orthanc_ai_queue_depth", "gauge", "Jobs waiting for a worker.")
    out.sample("orthanc_ai_queue_depth", sum(n for (s, _), n in counts.items() if s in ("pending", "queued")))

    stages: dict[tuple[str, str], list[float]] = {}
    for model, queued, started, done, timings in finished:
        if queued:
            stages.setdefault((model, "queue_wait"), []).append(max(started - queued, 0.0))
        stages.setdefault((model, "run"), []).append(max(done - started, 0.0))
        for stage, seconds in json.loads(timings or "{}").items():
            stages.setdefault((model, stage), []).append(float(seconds))
    out.family("orthanc_ai_job_stage_seconds", "histogram",
               "Duration of each stage of finished jobs: queue_wait, run, and the worker's load/model/write/store.")
    for (model, stage), values in sorted(stages.items()):
        out.histogram("orthanc_ai_job_stage_seconds", values, model=model, stage=stage)

    info = health()
    outbox = info.get("outbox", {})
    out.family("orthanc_ai_outbox_items", "gauge", "Outbox items by destination and state.")
    for dest, states in sorted(outbox.items()):
        for state, n in sorted(states.items()):
            out.sample("orthanc_ai_outbox_items", n, destination=dest, state=state)
    with store._lock:
        failures = (store.db.execute("select destination, sum(max(attempts - (state = 'delivered'), 0)) "
                                     "from outbox group by destination").fetchall()
                    if "outbox" in store.db.table_names() else [])
    out.family("orthanc_ai_outbox_failed_attempts_total", "counter", "Failed forwarding attempts per destination.")
    for dest, n in failures:
        out.sample("orthanc_ai_outbox_failed_attempts_total", n or 0, destination=dest)

    workers = info.get("worker", {}).get("processes", [])
    out.family("orthanc_ai_worker_up", "gauge", "1 when the local worker process is running.")
    out.family("orthanc_ai_worker_restarts_total", "counter", "Restarts of each local worker process.")
    for w in workers:
        out.sample("orthanc_ai_worker_up", 1 if w["state"] == "running" else 0, worker=w["id"])
        out.sample("orthanc_ai_worker_restarts_total", w["restarts"], worker=w["id"])
    for name, dest in sorted(info.get("destinations", {}).items()):
        if dest.get("echo") is not None:
            out.sample("orthanc_ai_destination_echo_ok", 1 if dest["echo"] == "ok" else 0, destination=name)
    return "\n".join(out.lines) + "\n"


def routes(store: JobStore, health: Callable[[], dict]) -> list[tuple[str, str, Callable]]:
    def metrics(request):
        return 200, RawBody(render(store, health).encode(), PROMETHEUS_TEXT)
    return [("GET", r"metrics", metrics)]
