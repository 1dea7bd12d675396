"""The worker's pipeline with a fake Orthanc client: one series, and several series for a multi-sequence model."""

from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.models.base import Code, ModelInfo, SegmentationResult, SegmentDescription
from inference.pipeline import JobContext, JobSkipped, run_segmentation

LESION = SegmentDescription(1, "Lesion", Code("49755003", "SCT", "Morphologically abnormal structure"),
                            Code("52988006", "SCT", "Lesion"), (255, 0, 0))
INFO = ModelInfo("two-channel", "Two-channel test model", "1", "segmentation", "MR", (LESION,), demonstration=True)


class FakeClient:
    def __init__(self, series: dict[str, Path]):
        self.series, self.stored = series, []

    def iter_series_datasets(self, series_id):
        files = sorted(self.series[series_id].glob("*.dcm"))
        for i, f in enumerate(files):
            yield i, len(files), pydicom.dcmread(f)

    def store_all(self, datasets):
        self.stored.extend(datasets)

    def post_json(self, uri, body, timeout=None):  # the follow-up comparison: nothing to compare
        class R:
            status_code = 404
            text = "no prior"
        return R()


class TwoChannelModel:
    """Marks voxels bright in both channels: proves both series arrive, on the first one's grid."""

    info = INFO

    def __init__(self):
        self.shapes = []

    def segment(self, volume, progress):
        raise AssertionError("a two-series job must use segment_channels")

    def segment_channels(self, volumes, progress):
        self.shapes = [v.shape for v in volumes]
        first, second = volumes
        labels = np.zeros(first.shape, np.uint8)
        labels[10:14, 100:120, 100:120] = 1
        progress(1.0)
        return SegmentationResult(labels)


def ctx():
    return JobContext(report=lambda p, m: None, cancelled=lambda: False)


def test_two_series_job_runs_segment_channels_and_writes_on_the_first_grid(shared_data):
    brain = shared_data / "mr_brain"
    client = FakeClient({"a": brain / "siemens_t1_fl2d_sag_HFS", "b": brain / "siemens_t1_fl2d_sag_HFDR"})
    model = TwoChannelModel()
    outputs = run_segmentation(client, ["a", "b"], model, ctx())
    assert len(outputs) == 4 and model.shapes == [(35, 256, 256), (35, 256, 256)]
    seg = next(ds for ds in client.stored if ds.Modality == "SEG")
    first = pydicom.dcmread(sorted((brain / "siemens_t1_fl2d_sag_HFS").glob("*.dcm"))[0], stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID


def test_a_single_series_model_refuses_a_multi_series_job(shared_data):
    brain = shared_data / "mr_brain"
    client = FakeClient({"a": brain / "siemens_t1_fl2d_sag_HFS", "b": brain / "siemens_t1_fl2d_sag_HFDR"})

    class OneChannel:
        info = INFO

        def segment(self, volume, progress):
            return SegmentationResult(np.zeros(volume.shape, np.uint8))
    with pytest.raises(JobSkipped, match="takes one series"):
        run_segmentation(client, ["a", "b"], OneChannel(), ctx())
