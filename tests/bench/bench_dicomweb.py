"""Cost of the plugin's WADO-RS series metadata route (``make bench``): not a timed test.

The plugin answers ``/dicom-web/studies/{s}/series/{s}/metadata`` itself (so that annotations keep their
coordinates; orthanc_plugin/dicomweb_metadata.py): for an image series it passes on the DICOMweb plugin's study
metadata cut to the series, or its per-instance answers joined. Reference in the same run: the DICOMweb plugin's
own study-level metadata of a study that holds that one series (the same instances, the same JSON), or, for a
series that is one of three equal series of its study, a third of that study route's time. A 35-slice brain MR
and a 300-slice series made of it, alone in their study, and a 100-slice series with two others; 7 copies of each
(each asked once uncached and from the reference, in alternating order, then again from the plugin's cache),
medians. Run: ``python -m tests.bench.bench_dicomweb``.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.bench.bench_ingest import SHARED
from tests.integration.harness import OrthancServer

COPIES = 7


def series_of(slices: int, folder: Path, study: str | None = None) -> tuple[str, str]:
    source = sorted((pydicom.dcmread(p) for p in (SHARED / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm")),
                    key=lambda ds: int(ds.InstanceNumber))
    study, series = study or generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for n in range(slices):
        ds = copy.deepcopy(source[n % len(source)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        ds.save_as(folder / f"{n:04d}.dcm")
    return study, series


def main() -> int:
    if not (SHARED / "mr_brain").is_dir():
        print(f"skipped: {SHARED / 'mr_brain'} is not there")
        return 0
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        # (series size, series in its study): the study route cut to the series alone, and the per-instance
        # route for a series that is a third of its study (reference: a third of the study route's time)
        cases = {(35, 1): [], (300, 1): [], (100, 3): []}
        for (n, per_study), copies in cases.items():
            for k in range(COPIES):
                study = generate_uid()
                made = [series_of(n, root / f"s{n}-{per_study}-{k}-{j}", study) for j in range(per_study)]
                copies.append((made[0], per_study))
        server = OrthancServer(root / "orthanc", overrides={"AI": {"AutoTrigger": False}}).start()
        try:
            server.storescu(*sorted(root.glob("s*-*")))
            for (n, per_study), copies in cases.items():
                times: dict[str, list[float]] = {"first": [], "again": [], "reference": []}
                for k, ((study, series), _) in enumerate(copies):  # each copy once uncached, again (cached), and
                    base = f"{server.url}/dicom-web/studies/{study}"  # from the reference: which goes first alternates
                    ours, reference = f"{base}/series/{series}/metadata", f"{base}/metadata"
                    order = [("first", ours), ("reference", reference)]
                    for name, url in (order if k % 2 == 0 else order[::-1]) + [("again", ours)]:
                        t0 = time.perf_counter()
                        r = server.session.get(url, timeout=120)
                        elapsed = time.perf_counter() - t0
                        times[name].append(elapsed / per_study if name == "reference" else elapsed)
                        r.raise_for_status()
                        assert len(r.json()) == n * (per_study if name == "reference" else 1), (name, len(r.json()))
                first, again, ref = (statistics.median(times[k]) for k in ("first", "again", "reference"))
                print(f"{n} instances, 1 of {per_study} series: plugin series metadata {first * 1000:.0f} ms the "
                      f"first time, {again * 1000:.0f} ms again; DICOMweb plugin {ref * 1000:.0f} ms "
                      f"→ ratio {first / ref:.2f} first, {again / ref:.2f} again")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
