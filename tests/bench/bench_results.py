"""Benchmark of the result writers (issue: standard results): not a timed test.

A 200-slice study (the real 35-slice brain series' first slice geometry, extended to 200 slices of
256×256) with 10 spherical lesions: time per object (SEG, RTSTRUCT, SR, PDF, plus measurement); and the
SEG writer with 100 segments. Median of 3 runs each. Run: ``python -m tests.bench.bench_results``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from inference.models.base import Code, ModelInfo, SegmentDescription
from inference.results.measurements import measure_findings
from inference.results.pdf import write_pdf_report
from inference.results.rtstruct import write_rt_structure_set
from inference.results.seg import write_segmentation
from inference.results.sr import write_measurement_report
from inference.volume import volume_from_datasets

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("AI_SHARED_DATA", REPO.parent / "shared" / "data"))


def synthetic_study(slices: int = 200) -> list[pydicom.Dataset]:
    template = pydicom.dcmread(sorted((SHARED / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm"))[17])
    study, series = generate_uid(), generate_uid()
    normal = np.cross(np.array(template.ImageOrientationPatient[:3], float),
                      np.array(template.ImageOrientationPatient[3:], float))
    rng = np.random.default_rng(0)
    out = []
    for k in range(slices):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.ImagePositionPatient = [float(v) for v in np.array(template.ImagePositionPatient, float) + normal * k]
        ds.SliceThickness, ds.InstanceNumber = 1.0, k + 1
        ds.PixelData = (rng.integers(0, 400, (ds.Rows, ds.Columns), dtype=np.uint16)).tobytes()
        out.append(ds)
    return out


def model(n_segments: int) -> ModelInfo:
    segments = tuple(SegmentDescription(
        label=i, name=f"Lesion type {i}", category=Code("49755003", "SCT", "Morphologically abnormal structure"),
        type=Code("52988006", "SCT", "Lesion"), color=((37 * i) % 256, (91 * i) % 256, (151 * i) % 256))
        for i in range(1, n_segments + 1))
    return ModelInfo(id="bench", name="Benchmark", version="1", task="segmentation", modality="MR",
                     segments=segments, demonstration=True)


def lesions(shape: tuple[int, int, int], count: int, labels_per_lesion: bool) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(1)
    kk, jj, ii = np.ogrid[:shape[0], :shape[1], :shape[2]]
    for n in range(count):
        c = rng.integers([20, 40, 40], [shape[0] - 20, shape[1] - 40, shape[2] - 40])
        r = rng.integers(4, 12)
        labels[(kk - c[0]) ** 2 + (jj - c[1]) ** 2 + (ii - c[2]) ** 2 <= r * r] = (n + 1) if labels_per_lesion else 1
    return labels


def timed(fn, repeats: int = 3):
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), value


def main() -> int:
    if not SHARED.is_dir():
        print(f"shared data not found at {SHARED}", file=sys.stderr)
        return 2
    volume = volume_from_datasets(synthetic_study())
    info = model(1)
    labels = lesions(volume.shape, 10, labels_per_lesion=False)
    u = generate_uid
    t_measure, findings = timed(lambda: measure_findings(volume, labels, info.segments, uid_parts=("b",)))
    t_seg, seg = timed(lambda: write_segmentation(volume, labels, info.segments, info,
                                                  series_instance_uid=u(), sop_instance_uid=u()))
    t_rt, _ = timed(lambda: write_rt_structure_set(volume, labels, info.segments, info,
                                                   series_instance_uid=u(), sop_instance_uid=u()))
    t_sr, _ = timed(lambda: write_measurement_report(volume, findings, seg, info,
                                                     series_instance_uid=u(), sop_instance_uid=u()))
    t_pdf, _ = timed(lambda: write_pdf_report(volume, labels, findings, info,
                                              series_instance_uid=u(), sop_instance_uid=u()))
    many = model(100)
    labels100 = lesions(volume.shape, 100, labels_per_lesion=True)
    t_seg100, _ = timed(lambda: write_segmentation(volume, labels100, many.segments, many,
                                                   series_instance_uid=u(), sop_instance_uid=u()), repeats=1)
    result = {"slices": volume.shape[0], "matrix": list(volume.shape[1:]), "findings": len(findings),
              "seconds": {"measure": round(t_measure, 2), "seg": round(t_seg, 2), "rtstruct": round(t_rt, 2),
                          "sr": round(t_sr, 2), "pdf": round(t_pdf, 2), "seg_100_segments": round(t_seg100, 2)}}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
