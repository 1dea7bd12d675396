"""REST handlers and the dispatcher against a fake Orthanc reader (no server)."""

import base64
import json
from dataclasses import dataclass, field

import pytest

from orthanc_plugin import jobs as J
from orthanc_plugin.events import Dispatcher
from orthanc_plugin.routes import Api, Request
from orthanc_plugin.rules import parse_rules

STUDY_UID = "1.2.826.0.1.1"
MR = "1.2.840.10008.5.1.4.1.1.4"


@dataclass
class FakeManifest:
    id: str
    version: str = "0.1.0"
    modality: str = "MR"
    params: dict = field(default_factory=dict)

    def to_json(self):
        return {"id": self.id, "version": self.version, "modality": self.modality}


class FakeOrthanc:
    def __init__(self):
        self.series = [
            {"ID": "ser-mr", "Instances": ["i1", "i2", "i3"],
             "MainDicomTags": {"Modality": "MR", "SeriesInstanceUID": "1.2.826.0.1.1.1", "SeriesDescription": "t1"}},
            {"ID": "ser-seg", "Instances": ["i9"],
             "MainDicomTags": {"Modality": "SEG", "SeriesInstanceUID": "1.2.826.0.1.1.9",
                               "SeriesDescription": "AI x", "Manufacturer": "Orthanc AI"}},
        ]

    def get_json(self, uri):
        if uri == "/studies/st":
            return {"MainDicomTags": {"StudyInstanceUID": STUDY_UID}}
        if uri == "/studies/st/series":
            return self.series
        raise KeyError(uri)

    def get_text(self, uri):
        return "1.2.840.10008.5.1.4.1.1.66.4" if "i9" in uri else MR

    def lookup_study(self, uid):
        return "st" if uid == STUDY_UID else None


@pytest.fixture
def api(tmp_path):
    store = J.JobStore(tmp_path / "j.sqlite", lease_seconds=30)
    models = {"brain": FakeManifest("brain")}
    d = Dispatcher(store, FakeOrthanc(), tuple(parse_rules([{"Modality": "MR", "Model": "brain"}])), lambda: models)
    a = Api(store, d, version="t", health=lambda: {"worker": {"state": "running"}}, models=lambda: models,
            reload_models=lambda: {"models": []}, lease_seconds=30)
    yield a
    store.close()


def call(api, method, path, body=None, query=None, user="alice"):
    auth = "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    return api.handle(Request(method, path, query or {}, raw, {"authorization": auth}))


def test_stable_study_routes_mr_once_and_ignores_our_seg(api):
    created = api.dispatcher.on_stable_study("st")
    assert [(j["model_id"], j["orthanc_series_id"], j["state"]) for j in created] == [("brain", "ser-mr", "queued")]
    assert api.dispatcher.on_stable_study("st") == []  # STABLE_STUDY again after our SEG: no new job


def test_more_instances_make_a_new_job(api):
    api.dispatcher.on_stable_study("st")
    api.dispatcher.orthanc.series[0]["Instances"].append("i4")
    assert len(api.dispatcher.on_stable_study("st")) == 1


def test_manual_segment_202_then_409_then_force(api):
    status, body = call(api, "POST", f"studies/{STUDY_UID}/segment", {})
    assert status == 202 and body["state"] == "queued" and body["trigger"] == "manual" and len(body["jobs"]) == 1
    status, body2 = call(api, "POST", f"studies/{STUDY_UID}/segment", {"model": "brain"})
    assert status == 409 and body["id"] in body2["jobs"]
    status, body3 = call(api, "POST", f"studies/{STUDY_UID}/segment", {"model": "brain", "force": True})
    assert status == 202 and body3["id"] != body["id"]
    assert api.store.get(body["id"])["state"] == "cancelled"  # superseded, not duplicated
    audit = api.store.audit(body3["id"])
    assert audit[0]["actor"] == "alice"


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": 3}, 400, "model"),
    ({"force": "yes"}, 400, "force"),
    ({"model": "nope"}, 400, "unknown model"),
])
def test_segment_bad_input(api, body, status, needle):
    code, out = call(api, "POST", f"studies/{STUDY_UID}/segment", body)
    assert code == status and needle in out["error"]


def test_unknown_study_and_job_are_404(api):
    assert call(api, "POST", "studies/1.2.3/segment", {})[0] == 404
    assert call(api, "GET", "jobs/" + "a" * 32)[0] == 404
    assert call(api, "GET", "nothing/here")[0] == 404
    assert call(api, "DELETE", "jobs")[0] == 405


def test_worker_protocol_claim_heartbeat_complete(api):
    call(api, "POST", f"studies/{STUDY_UID}/segment", {})
    status, claimed = call(api, "POST", "worker/claim", {"worker": "w1", "models": ["brain"]})
    assert status == 200 and claimed["model"]["id"] == "brain" and "lease_token" not in claimed["job"]
    job_id, lease = claimed["job"]["id"], claimed["lease"]
    assert call(api, "POST", "worker/claim", {"worker": "w1"})[0] == 204
    status, hb = call(api, "POST", f"jobs/{job_id}/heartbeat", {"lease": lease, "progress": 0.4})
    assert status == 200 and hb == {"state": "running", "cancel": False}
    assert call(api, "GET", f"jobs/{job_id}")[1]["progress"] == 0.4
    assert call(api, "POST", f"jobs/{job_id}/complete", {"lease": "wrong", "outputs": []})[0] == 409
    status, done = call(api, "POST", f"jobs/{job_id}/complete", {"lease": lease, "outputs": ["1.2.3"]})
    assert status == 200 and done["state"] == "done" and done["outputs"] == ["1.2.3"]
    status, listing = call(api, "GET", "jobs", query={"state": "done"})
    assert [j["id"] for j in listing["jobs"]] == [job_id] and listing["counts"]["done"] == 1


def test_worker_fail_skipped_and_cancel(api):
    call(api, "POST", f"studies/{STUDY_UID}/segment", {})
    claimed = call(api, "POST", "worker/claim", {"worker": "w1"})[1]
    status, job = call(api, "POST", f"jobs/{claimed['job']['id']}/fail",
                       {"lease": claimed["lease"], "error": "series has 1 slice", "skipped": True})
    assert status == 200 and job["state"] == "skipped" and job["error"] == "series has 1 slice"
    status, job2 = call(api, "POST", f"studies/{STUDY_UID}/segment", {"force": True})
    status, cancelled = call(api, "POST", f"jobs/{job2['id']}/cancel")
    assert status == 200 and cancelled["state"] == "cancelled"
    assert call(api, "POST", f"jobs/{job2['id']}/cancel")[0] == 409


def test_health_has_worker_and_counts(api):
    status, body = call(api, "GET", "health")
    assert status == 200 and body["worker"]["state"] == "running" and "queued" in body["jobs"]


def test_job_for_an_unavailable_model_fails_at_once_with_the_reason(api):
    broken = FakeManifest("brain")
    broken.status, broken.reason = "unavailable", "configs/inference.json is not valid JSON"
    api.dispatcher.models = lambda: {"brain": broken}
    job = api.dispatcher.on_stable_study("st")[0]
    assert job["state"] == "failed" and "inference.json" in job["error"]
    assert call(api, "POST", "worker/claim", {"worker": "w"})[0] == 204


def test_replay_changes_reroutes_idempotently(api):
    pages = {0: {"Changes": [{"ChangeType": "NewInstance", "ID": "i1"}, {"ChangeType": "NewStudy", "ID": "st"},
                             {"ChangeType": "StableStudy", "ID": "st"}], "Last": 3, "Done": True}}
    reader = api.dispatcher.orthanc
    original = reader.get_json
    reader.get_json = lambda uri: pages[0] if uri.startswith("/changes") else original(uri)
    count, last = api.dispatcher.replay_changes(0)
    assert (count, last) == (1, 3)
    assert api.dispatcher._queue.get_nowait() == "st"
    assert len(api.dispatcher.on_stable_study("st")) == 1 and api.dispatcher.on_stable_study("st") == []


def test_other_modules_can_add_routes(api):
    api.add_routes([("GET", r"patients/([^/]+)/lesions", lambda req, pid: (200, {"patient_id": pid}))])
    assert call(api, "GET", "patients/P1/lesions") == (200, {"patient_id": "P1"})


def test_rules_dry_run_with_candidate_rules(api):
    reader = api.dispatcher.orthanc
    original = reader.get_json
    reader.get_json = lambda uri: ["st"] if uri.startswith("/studies?") else original(uri)
    status, body = call(api, "POST", "rules/dry-run", {"rules": [{"Modality": "MR", "Model": "brain",
                                                                  "Priority": "urgent"}]})
    assert status == 200 and body["matched_studies"] == 1
    (match,) = body["studies"][0]["matches"]
    assert match["model"] == "brain" and match["priority"] == 10 and match["series_description"] == "t1"
    assert api.store.counts()["queued"] == 0  # a dry run queues nothing
    status, body = call(api, "POST", "rules/dry-run", {"rules": [{"Modality": "CT", "Model": "brain"}]})
    assert body["matched_studies"] == 0
    assert call(api, "POST", "rules/dry-run", {"rules": [{"Modality": "CT"}]})[0] == 400
    assert call(api, "GET", "rules")[1]["rules"][0]["models"] == ["brain"]


def test_claim_long_poll_returns_as_soon_as_a_job_is_queued(api):
    import threading
    import time
    threading.Timer(0.3, lambda: call(api, "POST", f"studies/{STUDY_UID}/segment", {})).start()
    t0 = time.time()
    status, body = call(api, "POST", "worker/claim", {"worker": "w", "wait": 5})
    assert status == 200 and 0.2 < time.time() - t0 < 1.9
    t0 = time.time()
    assert call(api, "POST", "worker/claim", {"worker": "w", "wait": 0.3})[0] == 204
    assert 0.25 < time.time() - t0 < 2
    assert call(api, "POST", "worker/claim", {"worker": "w", "wait": -1})[0] == 400


def test_delete_study_cancels_jobs_and_audits(api):
    deleted = []
    api.dispatcher.orthanc.delete_study = deleted.append
    status, job = call(api, "POST", f"studies/{STUDY_UID}/segment", {})
    status, body = call(api, "DELETE", f"studies/{STUDY_UID}", user="dr-house")
    assert status == 200 and body["cancelled_jobs"] == [job["id"]] and deleted == ["st"]
    assert api.store.get(job["id"])["state"] == "cancelled"
    entry = [a for a in api.store.audit() if a["event"] == "study-deleted"][0]
    assert entry["actor"] == "dr-house" and entry["study_instance_uid"] == STUDY_UID
    assert call(api, "DELETE", "studies/1.2.3.4")[0] == 404


def test_multi_sequence_model_gets_one_job_with_a_series_per_channel(api):
    reader = api.dispatcher.orthanc
    reader.series.append({"ID": "ser-flair", "Instances": ["f1", "f2", "f3"],
                          "MainDicomTags": {"Modality": "MR", "SeriesInstanceUID": "1.2.826.0.1.1.2",
                                            "SeriesDescription": "AX FLAIR"}})
    brats = FakeManifest("brats", params={"inputs": [{"name": "T1", "SeriesDescription": "^t1"},
                                                     {"name": "FLAIR", "SeriesDescription": "flair"}]})
    api.dispatcher.models = api.models = lambda: {"brats": brats}
    api.dispatcher.rules = tuple(parse_rules([{"Modality": "MR", "Model": "brats"}]))
    (job,) = api.dispatcher.on_stable_study("st")  # two MR series matched the rule, still one job
    assert job["state"] == "queued" and job["inputs"] == [["T1", "ser-mr"], ["FLAIR", "ser-flair"]]
    assert api.dispatcher.on_stable_study("st") == []  # same inputs: nothing new
    claimed = call(api, "POST", "worker/claim", {"worker": "w"})[1]
    assert claimed["job"]["inputs"] == [["T1", "ser-mr"], ["FLAIR", "ser-flair"]]
    reader.series.pop()  # a study without FLAIR
    reader.series[0]["Instances"].append("i4")
    (skipped,) = api.dispatcher.on_stable_study("st")
    assert skipped["state"] == "skipped" and "FLAIR (series description matching 'flair')" in skipped["error"]
