"""Prometheus exposition from the job store."""

from orthanc_plugin import jobs as J
from orthanc_plugin.metrics import render


def test_metrics_text(tmp_path):
    store = J.JobStore(tmp_path / "j.sqlite")
    for i in range(2):
        job = store.enqueue(store.create(J.NewJob("1.2", "s", f"1.2.{i}", "x", "brain", "1"))["id"])
        lease = store.claim("w")["lease_token"]
        store.complete(job["id"], lease, ["9"], timings={"model": 1.5, "write": 0.2})
    store.enqueue(store.create(J.NewJob("1.2", "s", "1.2.9", "x", "brain", "1"))["id"])
    text = render(store, lambda: {"worker": {"processes": [{"id": "w0", "state": "running", "restarts": 2}]},
                                  "outbox": {"pacs": {"pending": 1, "delivered": 3, "dead": 0}},
                                  "destinations": {"pacs": {"echo": "failed: refused"}}})
    lines = text.splitlines()
    assert 'orthanc_ai_jobs{state="done",model="brain"} 2' in lines
    assert "orthanc_ai_queue_depth 1" in lines
    assert 'orthanc_ai_job_stage_seconds_bucket{model="brain",stage="model",le="2"} 2' in lines
    assert 'orthanc_ai_job_stage_seconds_bucket{model="brain",stage="model",le="1"} 0' in lines
    assert 'orthanc_ai_job_stage_seconds_count{model="brain",stage="run"} 2' in lines
    assert 'orthanc_ai_outbox_items{destination="pacs",state="pending"} 1' in lines
    assert 'orthanc_ai_worker_restarts_total{worker="w0"} 2' in lines
    assert 'orthanc_ai_destination_echo_ok{destination="pacs"} 0' in lines
    assert all(l.startswith("#") or " " in l for l in lines)
    store.close()
