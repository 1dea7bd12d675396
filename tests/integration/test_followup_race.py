"""Follow-up with two workers: the new study and its unmeasured prior run side by side, so the new study's
report may be written before the prior is measured. It must end up with the comparison all the same (redone
once the prior's SR is in), with one SR in the study, not two."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from tests.integration.harness import OrthancServer, wait_for
from tests.integration.test_followup import TIMEPOINTS, _phantom_series


def _texts(items) -> list[str]:
    out = []
    for item in items or []:
        if item.get("ValueType") == "TEXT":
            out.append(str(item.TextValue))
        out += _texts(item.get("ContentSequence"))
    return out


@pytest.fixture(scope="module")
def studies(shared_data: Path, tmp_path_factory) -> list[tuple[str, Path]]:
    folder = shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS"
    source = sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda ds: int(ds.InstanceNumber))
    root = tmp_path_factory.mktemp("race-series")
    out = []
    for i, (date, lesions) in enumerate(TIMEPOINTS[:2]):
        study, _ = _phantom_series(source, root / f"tp{i}", date, lesions)
        out.append((study, root / f"tp{i}"))
    return out


def test_new_study_gets_its_comparison_although_its_prior_ran_beside_it(studies, tmp_path_factory) -> None:
    (prior, prior_dir), (new, new_dir) = studies
    root = tmp_path_factory.mktemp("orthanc-race")
    off = OrthancServer(root, {"AI": {"Enabled": False}}).start(wait=False)
    try:
        wait_for(off._up, 30, "Orthanc without the AI extension")
        off.storescu(prior_dir)  # stored before the AI extension: a prior nobody measured
    finally:
        off.stop()
    server = OrthancServer(root, {"AI": {"WorkerCount": 2}}).start()
    try:
        server.storescu(new_dir)
        server.wait_jobs(prior, 1, timeout=240)

        def final_report():
            jobs = server.get(f"/ai/studies/{new}/jobs")["jobs"]
            if not jobs or any(j["state"] not in ("done", "failed", "skipped", "cancelled") for j in jobs):
                return None
            srs = [s for s in server.series_of_study(new) if s["MainDicomTags"].get("Modality") == "SR"]
            if len(srs) != 1 or len(srs[0]["Instances"]) != 1:
                return None
            data = server.session.get(f"{server.url}/instances/{srs[0]['Instances'][0]}/file", timeout=30).content
            texts = _texts(pydicom.dcmread(io.BytesIO(data)).ContentSequence)
            return (jobs, texts) if any(t.startswith("Comparison with the study of") for t in texts) else None
        try:
            jobs, texts = wait_for(final_report, 240, "the new study's report with its comparison", interval=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{server.log()[-4000:]}") from None
        assert all(j["state"] == "done" for j in jobs), jobs
        assert len(jobs) in (1, 2), jobs  # redone at most once
        assert any("20230110" in t or "2023-01-10" in t for t in texts), texts  # the prior's date
    finally:
        server.stop()
