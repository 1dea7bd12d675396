"""One job as a list of steps: load → model → write → store. Each step is testable without Orthanc."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom

from inference.client import OrthancClient
from inference.models.base import InputNotSupported, SegmentationModel
from inference.results.identity import derived_uid
from inference.results.measurements import measure_findings
from inference.results.pdf import write_pdf_report
from inference.results.rtstruct import write_rt_structure_set
from inference.results.seg import write_segmentation
from inference.results.sr import write_measurement_report
from inference.volume import UnsupportedInput, Volume, VolumeError, volume_from_datasets

log = logging.getLogger("inference.pipeline")


class JobCancelled(Exception):
    """The job was cancelled (or its lease lost) while it ran; stop without reporting a result."""


class JobSkipped(Exception):
    """The input is not something the model handles; the job ends 'skipped' with this reason."""


@dataclass
class JobContext:
    """What a step may use: progress reporting and a cancellation check."""

    report: Callable[[float, str], None]
    cancelled: Callable[[], bool]
    timings: dict[str, float] = field(default_factory=dict)

    def step(self, fraction: float, message: str) -> None:
        if self.cancelled():
            raise JobCancelled(message)
        self.report(fraction, message)


def load_series(client: OrthancClient, orthanc_series_id: str, ctx: JobContext,
                span: tuple[float, float] = (0.0, 0.3)) -> list[pydicom.Dataset]:
    datasets = []
    for i, count, ds in client.iter_series_datasets(orthanc_series_id):
        datasets.append(ds)
        if i % 8 == 0 or i == count - 1:
            ctx.step(span[0] + (span[1] - span[0]) * (i + 1) / count, f"reading instance {i + 1}/{count}")
    return datasets


def build_volume(datasets: list[pydicom.Dataset], min_slices: int) -> Volume:
    try:
        return volume_from_datasets(datasets, min_slices=min_slices)
    except UnsupportedInput as exc:
        raise JobSkipped(str(exc)) from exc


def result_uids(volume: Volume, model: SegmentationModel, kind: str) -> tuple[str, str]:
    """Series and SOP Instance UIDs derived from (study, model id + version, input series): a re-run of the
    same model on the same series yields the same UIDs and therefore replaces its earlier result."""
    parts = (volume.study_instance_uid, model.info.id, model.info.version, volume.series_instance_uid, kind)
    return derived_uid(*parts, "series"), derived_uid(*parts, "instance")


@dataclass(frozen=True)
class ReportSettings:
    """Site settings for the results, sent by the plugin with each claimed job."""

    language: str | None = None
    template_directory: Path | None = None

    @classmethod
    def from_claim(cls, settings: dict | None) -> "ReportSettings":
        settings = settings or {}
        folder = settings.get("report_template_directory")
        return cls(language=settings.get("report_language"), template_directory=Path(folder) if folder else None)


def write_results(volume: Volume, labels: np.ndarray, model: SegmentationModel,
                  report: ReportSettings = ReportSettings(),
                  compare: Callable[[Volume, list], dict | None] | None = None) -> list[pydicom.Dataset]:
    """All result objects of one segmentation, built before any is stored (all or nothing):
    SEG, RT Structure Set, TID 1500 measurement SR, encapsulated PDF report (with the comparison to the
    patient's previous study when ``compare`` finds one)."""
    info = model.info
    findings = measure_findings(volume, labels, info.segments,
                                uid_parts=(volume.study_instance_uid, info.id, info.version,
                                           volume.series_instance_uid))
    comparison = compare(volume, findings) if compare else None
    series, sop = result_uids(volume, model, "SEG")
    seg = write_segmentation(volume, labels, info.segments, info, series_instance_uid=series, sop_instance_uid=sop)
    series, sop = result_uids(volume, model, "RTSTRUCT")
    rtstruct = write_rt_structure_set(volume, labels, info.segments, info, series_instance_uid=series,
                                      sop_instance_uid=sop)
    series, sop = result_uids(volume, model, "SR")
    sr = write_measurement_report(volume, findings, seg, info, series_instance_uid=series, sop_instance_uid=sop,
                                  comparison=comparison_sentences(comparison))
    series, sop = result_uids(volume, model, "PDF")
    pdf = write_pdf_report(volume, labels, findings, info, series_instance_uid=series, sop_instance_uid=sop,
                           language=report.language, template_dir=report.template_directory,
                           comparison=(comparison or {}).get("comparison") or None,
                           response=response_line(comparison))
    return [seg, rtstruct, sr, pdf]


def response_line(answer: dict | None) -> str | None:
    """The overall response with the sum of longest diameters it rests on, for the report."""
    if not answer:
        return None
    text = (answer.get("response") or {}).get("text") or ""
    total = answer.get("sum_of_longest_diameters") or {}
    if total.get("prior_mm") is not None and total.get("current_mm") is not None:
        change = total.get("change_percent")
        text += (f" Sum of longest diameters {total['prior_mm']:.1f} → {total['current_mm']:.1f} mm"
                 + (f" ({change:+.0f} %)." if isinstance(change, (int, float)) else "."))
    return text.strip() or None


def comparison_sentences(answer: dict | None) -> list[str]:
    """The follow-up's comparison as plain sentences for the SR (the PDF shows it as a table)."""
    if not answer:
        return []
    prior = answer.get("prior") or {}
    out = [f"Comparison with the study of {prior.get('date') or 'an earlier date'} "
           f"({prior.get('study_instance_uid', '')})."]
    for item in answer.get("comparison") or []:
        change = item.get("change_percent")
        out.append(f"{item.get('tracking_id', 'Lesion')}: {item.get('status', '')}, volume "
                   f"{item.get('prior_volume_ml', '—')} → {item.get('current_volume_ml', '—')} ml"
                   + (f" ({change:+.0f} %)" if isinstance(change, (int, float)) else "") + ".")
    text = response_line(answer)
    if text:
        out.append(text)
    return out


def run_segmentation(client: OrthancClient, orthanc_series_id: str | list[str], model: SegmentationModel,
                     ctx: JobContext, *, min_slices: int = 3, report: ReportSettings = ReportSettings()) -> list[str]:
    """The whole job: returns the SOP Instance UIDs stored into the study. Several series (one per input
    channel of a multi-sequence model) are resampled onto the first one's grid, where the results live."""
    series_ids = [orthanc_series_id] if isinstance(orthanc_series_id, str) else list(orthanc_series_id)
    t0 = time.perf_counter()
    volumes = []
    for n, series_id in enumerate(series_ids):
        span = (0.3 * n / len(series_ids), 0.3 * (n + 1) / len(series_ids))
        datasets = load_series(client, series_id, ctx, span)
        volumes.append(build_volume(datasets, min_slices))
        del datasets
    ctx.timings["load"] = time.perf_counter() - t0
    volume = volumes[0]
    ctx.step(0.35, f"running {model.info.id}")
    t1 = time.perf_counter()

    def progress(p: float) -> None:
        ctx.step(0.35 + 0.5 * max(0.0, min(1.0, p)), "segmenting")
    try:
        if len(volumes) > 1:
            if not hasattr(model, "segment_channels"):
                raise JobSkipped(f"{model.info.id} takes one series, but the job has {len(volumes)}")
            result = model.segment_channels(volumes, progress)
        else:
            result = model.segment(volume, progress)
    except InputNotSupported as exc:
        raise JobSkipped(str(exc)) from exc
    ctx.timings["model"] = time.perf_counter() - t1
    ctx.step(0.87, "writing SEG, RTSTRUCT, SR and PDF")
    t2 = time.perf_counter()
    objects = write_results(volume, result.labels, model, report,
                            compare=lambda v, findings: request_comparison(client, v, findings))
    ctx.timings["write"] = time.perf_counter() - t2
    ctx.step(0.95, "storing results in Orthanc")
    t3 = time.perf_counter()
    client.store_all(objects)
    ctx.timings["store"] = time.perf_counter() - t3
    return [str(ds.SOPInstanceUID) for ds in objects]


def request_comparison(client: OrthancClient, volume: Volume, findings: list) -> dict | None:
    """The follow-up's comparison of this study with the patient's previous one, before our SR exists.

    ``POST /ai/studies/{uid}/comparison`` with the findings (volume, diameters, centre in patient mm) and where
    the imaged volume lies, so the plugin can match them against the stored SRs of earlier studies. Returns its
    answer (``comparison`` items for ``write_pdf_report``, ``response["text"]``, ``prior``), or None when there
    is nothing to compare or the plugin does not answer: the report is then written without a comparison.
    """
    from inference.client import OrthancUnavailable

    source = volume.datasets[0] if volume.datasets else pydicom.Dataset()
    patient_id = str(source.get("PatientID", "") or "")
    if not patient_id:
        return None
    slices, rows, columns = volume.shape
    centre = volume.affine @ np.array([(columns - 1) / 2.0, (rows - 1) / 2.0, (slices - 1) / 2.0, 1.0])
    body = {
        "patient_id": patient_id,
        "study_date": str(source.get("StudyDate", "") or ""),
        "study_time": str(source.get("StudyTime", "") or ""),
        "frame_of_reference_uid": volume.frame_of_reference_uid or "",
        "volume_centre_mm": [float(v) for v in centre[:3]],
        "findings": [{
            "tracking_uid": f.tracking_uid, "tracking_id": f.tracking_id, "volume_ml": float(f.volume_ml),
            "longest_diameter_mm": float(f.longest_axial_diameter_mm),
            "short_axis_mm": float(f.perpendicular_axial_diameter_mm),
            "max_3d_diameter_mm": float(f.max_3d_diameter_mm),
            "centroid_mm": [float(v) for v in f.centroid_mm],
        } for f in findings],
    }
    try:
        r = client.post_json(f"/ai/studies/{volume.study_instance_uid}/comparison", body, timeout=30)
    except OrthancUnavailable as exc:
        log.warning("no comparison with prior studies: %s", exc)
        return None
    if r.status_code != 200:
        log.warning("no comparison with prior studies: %s %s", r.status_code, r.text[:200])
        return None
    answer = r.json()
    return answer if answer.get("prior") else None


__all__ = ["JobCancelled", "JobContext", "JobSkipped", "ReportSettings", "VolumeError", "request_comparison",
           "run_segmentation", "result_uids", "write_results"]
