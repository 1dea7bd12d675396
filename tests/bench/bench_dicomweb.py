"""Cost of the plugin's WADO-RS series metadata route (``make bench``): not a timed test.

The plugin answers ``/dicom-web/studies/{s}/series/{s}/metadata`` itself (so that annotations keep their
coordinates; orthanc_plugin/dicomweb_metadata.py): for an image series it joins the DICOMweb plugin's
per-instance answers. Reference in the same run: the DICOMweb plugin's own study-level metadata of a study that
holds that one series (the same instances, the same JSON). A 35-slice brain MR and a 300-slice copy of it,
interleaved, medians of 15. Run: ``python -m tests.bench.bench_dicomweb``.
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

ROUNDS = 15


def series_of(slices: int, folder: Path) -> tuple[str, str]:
    source = sorted((pydicom.dcmread(p) for p in (SHARED / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm")),
                    key=lambda ds: int(ds.InstanceNumber))
    study, series = generate_uid(), generate_uid()
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
        cases = {n: series_of(n, root / f"s{n}") for n in (35, 300)}
        server = OrthancServer(root / "orthanc", overrides={"AI": {"AutoTrigger": False}}).start()
        try:
            for n, _ in cases.items():
                server.storescu(root / f"s{n}")
            for n, (study, series) in cases.items():
                base = f"{server.url}/dicom-web/studies/{study}"
                times: dict[str, list[float]] = {"plugin series route": [], "DICOMweb study route": []}
                sizes = {}
                for _ in range(ROUNDS):
                    for name, url in (("plugin series route", f"{base}/series/{series}/metadata"),
                                      ("DICOMweb study route", f"{base}/metadata")):
                        t0 = time.perf_counter()
                        r = server.session.get(url, timeout=120)
                        times[name].append(time.perf_counter() - t0)
                        r.raise_for_status()
                        sizes[name] = len(r.json())
                assert len(set(sizes.values())) == 1 and n in sizes.values(), sizes
                ours, ref = (statistics.median(times[k]) for k in times)
                print(f"{n} instances: plugin series metadata {ours * 1000:.0f} ms, DICOMweb study metadata "
                      f"{ref * 1000:.0f} ms → ratio {ours / ref:.2f} ({(ours - ref) / n * 1000:+.2f} ms per instance)")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
