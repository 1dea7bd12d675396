"""Whole-slide stages run in a worker of their own: a slide that takes minutes never holds up a radiology job.

The slide worker is frozen (SIGSTOP) while a slide waits and a brain MR study arrives: the radiology worker
still segments the study, and does not take the slide; once the slide worker goes on, the slide is analysed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pydicom
import pytest

from tests.integration.harness import wait_for

pytest.importorskip("tiffslide", reason="the slide readers are not installed: run `make test`")


def test_radiology_jobs_do_not_wait_for_slides(orthanc, shared_data: Path, tmp_path: Path) -> None:
    from inference.pathology.synthetic import write_synthetic_slide

    series = shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS"
    processes = wait_for(lambda: (lambda ps: ps if len(ps) == 2 and all(p["pid"] for p in ps) else None)(
        orthanc.health()["worker"]["processes"]), 60, "both workers to run")
    assert sorted(p["role"] for p in processes) == ["radiology", "slides"]
    slides_worker = next(p for p in processes if p["role"] == "slides")

    os.kill(slides_worker["pid"], signal.SIGSTOP)
    try:
        path = write_synthetic_slide(tmp_path / "waiting.tif", 2048)
        r = orthanc.session.post(orthanc.url + "/ai/slides", data=path.read_bytes(), timeout=60, headers={
            "Content-Type": "application/octet-stream", "Content-Disposition": 'attachment; filename="waiting.tif"'})
        assert r.status_code == 202, r.text
        slide_id = r.json()["id"]

        orthanc.storescu(series)
        study = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
        jobs = orthanc.wait_jobs(study, 1, timeout=180)
        assert [j["state"] for j in jobs] == ["done"], jobs
        slide = orthanc.get(f"/ai/slides/{slide_id}")
        assert slide["status"] in ("pending", "queued"), slide  # nobody else took it
    finally:
        os.kill(slides_worker["pid"], signal.SIGCONT)

    def finished():
        slide = orthanc.get(f"/ai/slides/{slide_id}")
        return slide if slide["status"] in ("done", "failed", "skipped") else None
    slide = wait_for(finished, 240, "the slide to be analysed", interval=0.5)
    assert slide["status"] == "done", slide
    actors = {entry.get("actor", "") for entry in orthanc.get(f"/ai/slides/{slide_id}/audit")["audit"]}
    assert any(actor.endswith("-slides") for actor in actors), actors
