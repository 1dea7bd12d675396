"""Priors from the hospital PACS (a second, plain Orthanc): C-FIND + C-MOVE through Orthanc's modalities."""

from __future__ import annotations

import pytest

from tests.integration.harness import OrthancServer, PlainOrthanc, free_port, wait_for
from tests.integration.test_fault_tolerance import brain, brain_copy  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    our_dicom = free_port()
    pacs = PlainOrthanc(tmp_path_factory.mktemp("pacs"),
                        modalities={"ai": ["ORTHANC", "127.0.0.1", our_dicom]}).start()
    ours = OrthancServer(tmp_path_factory.mktemp("ours"), overrides={
        "DicomModalities": {"pacs": ["PACS", "127.0.0.1", pacs.dicom_port]},
        "AI": {"Priors": {"Source": "pacs", "Auto": True}}})
    ours.dicom_port = our_dicom
    ours.start()
    yield ours, pacs
    ours.stop()
    pacs.stop()


def test_new_study_brings_its_priors_which_are_processed_too(network, brain, tmp_path):  # noqa: F811
    ours, pacs = network
    prior = brain_copy(brain, tmp_path / "prior", patient="PRIORS-1", date="20240115")
    older = brain_copy(brain, tmp_path / "older", patient="PRIORS-1", date="20230115")
    pacs.storescu(tmp_path / "prior")
    pacs.storescu(tmp_path / "older")
    current = brain_copy(brain, tmp_path / "current", patient="PRIORS-1", date="20260115")
    ours.storescu(tmp_path / "current")

    wait_for(lambda: ours.study_id(prior) and ours.study_id(older), 90, "the priors to be moved here")
    for study in (current, prior, older):
        jobs = ours.wait_jobs(study, timeout=240)
        assert len(jobs) == 1, [(j["trigger"], j["state"], j["input_fingerprint"], j["created_at"], j["error"])
                                for j in jobs]
        assert jobs[0]["state"] == "done", jobs[0]


def test_manual_retrieval_reports_what_is_already_here(network, brain, tmp_path):  # noqa: F811
    ours, pacs = network
    r = ours.post("/ai/patients/PRIORS-1/retrieve-priors", {})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["found"] == 2 and body["already_here"] == 2 and body["retrieving"] == []
    r = ours.post("/ai/patients/PRIORS-1/retrieve-priors", {"source": "nowhere"})
    assert r.status_code == 400 and "C-FIND" in r.json()["error"]
