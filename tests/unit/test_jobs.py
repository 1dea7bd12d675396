"""Job state machine and store: every legal and illegal transition, leases, retries, ETA."""

import itertools

import pytest

from orthanc_plugin import jobs as J


def new_job(series="1.2.3.4", model="m", trigger="auto", priority=0):
    return J.NewJob(study_instance_uid="1.2.3", orthanc_study_id="s", series_instance_uid=series,
                    orthanc_series_id="x", model_id=model, model_version="1", input_fingerprint="instances=3",
                    trigger=trigger, priority=priority)


@pytest.fixture
def store(tmp_path):
    events = []
    s = J.JobStore(tmp_path / "jobs.sqlite", max_attempts=2, lease_seconds=30,
                   on_transition=lambda job, old, new, actor: events.append((old, new)))
    s.events = events
    yield s
    s.close()


@pytest.mark.parametrize("old,new", list(itertools.product(J.STATES, J.STATES)))
def test_transition_table_is_enforced(old, new):
    legal = new in J.TRANSITIONS[old]
    if legal:
        J.check_transition(old, new)
    else:
        with pytest.raises(J.IllegalTransition):
            J.check_transition(old, new)


def test_terminal_states_have_no_exit():
    for state in J.TERMINAL:
        assert J.TRANSITIONS[state] == frozenset()
    assert J.TRANSITIONS[J.PENDING] >= {J.QUEUED, J.CANCELLED}
    assert J.TRANSITIONS[J.RUNNING] >= {J.DONE, J.FAILED, J.CANCELLED}


def test_happy_path_and_audit(store):
    job = store.create(new_job())
    assert job["state"] == J.PENDING
    store.enqueue(job["id"])
    claimed = store.claim("w1")
    assert claimed["id"] == job["id"] and claimed["state"] == J.RUNNING and claimed["attempts"] == 1
    store.heartbeat(job["id"], claimed["lease_token"], progress=0.5, message="half")
    assert store.get(job["id"])["progress"] == 0.5
    done = store.complete(job["id"], claimed["lease_token"], ["1.2.3.9"])
    assert done["state"] == J.DONE and done["outputs"] == ["1.2.3.9"] and done["progress"] == 1.0
    trail = [(a["from_state"], a["to_state"]) for a in store.audit(job["id"])]
    assert trail == [(None, "pending"), ("pending", "queued"), ("queued", "running"), ("running", "done")]
    assert store.events == [("pending", "queued"), ("queued", "running"), ("running", "done")]


def test_claim_order_priority_then_fifo(store):
    a = store.enqueue(store.create(new_job("1.1"))["id"])
    b = store.enqueue(store.create(new_job("1.2"))["id"])
    c = store.enqueue(store.create(new_job("1.3", trigger="manual", priority=1))["id"])
    assert store.queue_position(store.get(c["id"])) == 0
    assert store.queue_position(store.get(a["id"])) == 1
    assert store.queue_position(store.get(b["id"])) == 2
    assert [store.claim("w")["id"] for _ in range(3)] == [c["id"], a["id"], b["id"]]
    assert store.claim("w") is None


def test_claim_only_models_the_worker_has(store):
    store.enqueue(store.create(new_job(model="other"))["id"])
    assert store.claim("w", models=["m"]) is None
    assert store.claim("w", models=["other"])["model_id"] == "other"


def test_wrong_lease_is_refused(store):
    job = store.enqueue(store.create(new_job())["id"])
    store.claim("w")
    with pytest.raises(J.LeaseMismatch):
        store.complete(job["id"], "not-the-lease", [])
    with pytest.raises(J.LeaseMismatch):
        store.heartbeat(job["id"], "nope")


def test_expired_lease_requeues_then_fails_after_max_attempts(store):
    job = store.enqueue(store.create(new_job())["id"])
    first = store.claim("w1")
    released = store.release_expired(now=first["lease_expires"] + 1)
    assert [j["state"] for j in released] == [J.QUEUED]
    assert "lease expired" in store.get(job["id"])["error"]
    second = store.claim("w2")
    assert second["attempts"] == 2
    with pytest.raises(J.LeaseMismatch):  # the first worker comes back too late
        store.complete(job["id"], first["lease_token"], [])
    released = store.release_expired(now=second["lease_expires"] + 1)
    assert released[0]["state"] == J.FAILED and "gave up after 2 attempts" in released[0]["error"]


def test_release_worker_requeues_only_its_jobs(store):
    a = store.enqueue(store.create(new_job("1.1"))["id"])
    b = store.enqueue(store.create(new_job("1.2"))["id"])
    store.claim("dead")
    store.claim("alive")
    store.release_worker("dead", "worker exited with code -9")
    assert store.get(a["id"])["state"] == J.QUEUED
    assert store.get(b["id"])["state"] == J.RUNNING


def test_retryable_failure_requeues_non_retryable_fails(store):
    job = store.enqueue(store.create(new_job())["id"])
    lease = store.claim("w")["lease_token"]
    assert store.fail(job["id"], lease, "Orthanc did not answer", retryable=True)["state"] == J.QUEUED
    lease = store.claim("w")["lease_token"]
    failed = store.fail(job["id"], lease, "Orthanc did not answer", retryable=True)  # attempts exhausted
    assert failed["state"] == J.FAILED and failed["error"] == "Orthanc did not answer"


def test_cancel_running_job_is_seen_by_heartbeat_and_blocks_completion(store):
    job = store.enqueue(store.create(new_job())["id"])
    lease = store.claim("w")["lease_token"]
    store.cancel(job["id"], actor="alice")
    assert store.heartbeat(job["id"], lease)["state"] == J.CANCELLED
    with pytest.raises(J.JobError):
        store.complete(job["id"], lease, ["1.2"])
    with pytest.raises(J.IllegalTransition):
        store.cancel(job["id"])


def test_skip_pending_and_running(store):
    a = store.create(new_job("1.1"))
    assert store.skip(a["id"], "no MR series")["state"] == J.SKIPPED
    b = store.enqueue(store.create(new_job("1.2"))["id"])
    lease = store.claim("w")["lease_token"]
    assert store.skip(b["id"], "single slice", lease_token=lease)["error"] == "single slice"


def test_unknown_job_and_bad_state_filter(store):
    with pytest.raises(J.JobNotFound):
        store.get("0" * 32)
    with pytest.raises(J.JobError):
        store.list(state="exploded")


def test_find_dedupe_and_counts(store):
    job = store.enqueue(store.create(new_job())["id"])
    assert store.find(series_instance_uid="1.2.3.4", model_id="m", model_version="1",
                      input_fingerprint="instances=3")[0]["id"] == job["id"]
    assert store.find(series_instance_uid="1.2.3.4", model_id="m", model_version="1",
                      input_fingerprint="instances=4") == []
    assert store.counts()[J.QUEUED] == 1


def test_eta_from_recent_durations(store):
    for i in range(3):
        job = store.enqueue(store.create(new_job(f"1.{i}"))["id"])
        lease = store.claim("w")["lease_token"]
        store.db["jobs"].update(job["id"], {"started_at": 100.0})
        store.complete(job["id"], lease, [])
        store.db["jobs"].update(job["id"], {"finished_at": 110.0})
    waiting = store.enqueue(store.create(new_job("1.9"))["id"])
    assert store.eta_seconds(store.get(waiting["id"])) == pytest.approx(10.0)
    view = J.public_view(store, store.get(waiting["id"]))
    assert view["queue_position"] == 0 and "lease_token" not in view


def test_store_survives_reopen(tmp_path):
    s = J.JobStore(tmp_path / "j.sqlite")
    job = s.enqueue(s.create(new_job())["id"])
    s.close()
    again = J.JobStore(tmp_path / "j.sqlite")
    assert again.get(job["id"])["state"] == J.QUEUED
    assert again.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
