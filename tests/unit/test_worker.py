"""The worker's job handling with a fake Orthanc client (no server): mismatch refusal, failure reporting."""

from dataclasses import dataclass

from inference.__main__ import Worker
from inference.models.manifest import BUILTIN_MODELS_DIR, load_manifests


@dataclass
class FakeResponse:
    status_code: int
    body: dict

    def json(self):
        return self.body

    @property
    def text(self):
        return str(self.body)


class FakeClient:
    def __init__(self):
        self.posts = []

    def post_json(self, uri, body, timeout=None):
        self.posts.append((uri, body))
        return FakeResponse(200, {"state": "running", "cancel": False})


def claimed(model_json):
    return {"job": {"id": "a" * 32, "model_id": "brain-lesion-candidates", "orthanc_series_id": "s", "attempts": 1},
            "lease": "L", "lease_seconds": 30, "model": model_json, "settings": {}}


def test_a_model_copy_that_differs_from_the_approved_one_is_never_run():
    manifests = {m.id: m for m in load_manifests([BUILTIN_MODELS_DIR])}
    client = FakeClient()
    worker = Worker(client, "w-test", manifests)
    worker.process(claimed({"id": "brain-lesion-candidates", "sha256": "0" * 64}))
    uri, body = client.posts[-1]
    assert uri == f"/ai/jobs/{'a' * 32}/fail" and body["lease"] == "L" and body["retryable"] is False
    assert "differs from the one Orthanc approved" in body["error"]


class IdleClient(FakeClient):
    def post_json(self, uri, body, timeout=None):
        self.posts.append((uri, body))
        return FakeResponse(204, {})


def test_roles_choose_the_queues_a_worker_serves():
    import pytest

    polled = []
    for role, claims, slides in (("all", 1, 1), ("radiology", 1, 0), ("slides", 0, 1)):
        client = IdleClient()
        worker = Worker(client, f"w-{role}", {}, poll_seconds=0.01, role=role)
        worker.poll_slides = lambda role=role: polled.append(role) or False
        worker.run_forever(once=True)
        assert sum(uri == "/ai/worker/claim" for uri, _ in client.posts) == claims, role
        assert polled.count(role) == slides, role
    with pytest.raises(ValueError, match="role must be one of"):
        Worker(IdleClient(), "w", {}, role="everything")
