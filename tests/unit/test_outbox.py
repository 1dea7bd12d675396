"""Durable outbox: backoff, dead letter, retry, delivery audit (fake sender, no server)."""

import pytest

from orthanc_plugin.config import Destination
from orthanc_plugin.jobs import JobError, JobStore
from orthanc_plugin.outbox import Backoff, Outbox


class FlakySender:
    def __init__(self, failures: int):
        self.failures, self.calls = failures, []

    def __call__(self, destination, resources):
        self.calls.append((destination.name, list(resources)))
        if len(self.calls) <= self.failures:
            raise ConnectionError("association refused")


@pytest.fixture
def make(tmp_path):
    stores = []

    def build(failures=0, max_age=100.0):
        store = JobStore(tmp_path / f"j{len(stores)}.sqlite")
        stores.append(store)
        sender = FlakySender(failures)
        box = Outbox(store, {"pacs": Destination("pacs", "dicom", "pacs")}, sender,
                     resolve=lambda uids: [f"orthanc-{u}" for u in uids],
                     backoff=Backoff(initial=2, maximum=8, max_age=max_age))
        return box, sender
    yield build
    for s in stores:
        s.close()


JOB = {"id": "j1", "study_instance_uid": "1.2", "destinations": ["pacs"], "outputs": ["1.2.3", "1.2.4"]}


def test_delivered_first_time(make):
    box, sender = make()
    (item_id,) = box.enqueue_job(JOB)
    assert box.run_once(now=box.get(item_id)["created_at"]) == 1
    item = box.get(item_id)
    assert item["state"] == "delivered" and item["attempts"] == 1
    assert sender.calls == [("pacs", ["orthanc-1.2.3", "orthanc-1.2.4"])]


def test_backoff_grows_with_jitter_then_delivers(make):
    box, sender = make(failures=3)
    (item_id,) = box.enqueue_job(JOB)
    t = box.get(item_id)["created_at"]
    delays = []
    for _ in range(3):
        item = box.attempt(box.get(item_id), now=t)
        assert item["state"] == "pending" and "association refused" in item["last_error"]
        delays.append(item["next_attempt_at"] - t)
        t = item["next_attempt_at"]
        assert box.run_once(now=t - 0.01) == 0  # not due yet
    assert delays[0] >= 1 and delays[0] <= 2 and 2 <= delays[1] <= 4 and 4 <= delays[2] <= 8
    assert box.run_once(now=t) == 1 and box.get(item_id)["state"] == "delivered"


def test_dead_letter_after_max_age_and_manual_retry(make):
    box, sender = make(failures=100, max_age=10)
    (item_id,) = box.enqueue_job(JOB)
    created = box.get(item_id)["created_at"]
    item = box.attempt(box.get(item_id), now=created + 11)
    assert item["state"] == "dead"
    assert box.counts()["pacs"]["dead"] == 1
    assert box.run_once(now=created + 1000) == 0  # dead items are not retried by themselves
    sender.failures = 0
    retried = box.retry(item_id)
    assert retried["state"] == "pending"
    box.run_once(now=retried["next_attempt_at"])
    assert box.get(item_id)["state"] == "delivered"
    with pytest.raises(JobError):
        box.retry(item_id)


def test_unknown_destination_or_no_outputs_enqueue_nothing(make):
    box, _ = make()
    assert box.enqueue_job({**JOB, "destinations": ["ghost"]}) == []
    assert box.enqueue_job({**JOB, "outputs": []}) == []
    assert box.enqueue_job({**JOB, "destinations": []}) == []


def test_results_gone_from_orthanc_is_an_error_not_a_success(make):
    box, sender = make()
    box.resolve = lambda uids: []
    (item_id,) = box.enqueue_job(JOB)
    item = box.attempt(box.get(item_id))
    assert item["state"] == "pending" and "no longer in Orthanc" in item["last_error"] and not sender.calls
