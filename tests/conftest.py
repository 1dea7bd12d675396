"""Shared test locations (repository root, read-only shared DICOM data) and one synthetic Enhanced MR source."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pydicom
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("AI_SHARED_DATA", REPO.parent / "shared" / "data"))

if str(REPO) not in sys.path:  # import the packages under test without installing them
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared test data folder; skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set AI_SHARED_DATA to its folder)")
    return SHARED_DATA


_SLICE_OF_FRAME = (3, 0, 7, 1, 9, 2, 5, 8, 4, 6)  # frame f of the synthetic Enhanced MR lies at slice [f - 1]


@pytest.fixture()
def enhanced_mr(shared_data: Path):
    """The pydicom Enhanced MR sample with the functional groups it lacks (coronal, frames stored out of order).

    The sample file was stripped of its functional groups, so we add them: a permuted frame order
    (``_SLICE_OF_FRAME``), 1.2 mm steps and a rescale of 2x - 10.
    """
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(shared_data / "mr" / "enhanced_mr_emri_small.dcm")
    orientation, pixel_measures, transformation = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal: normal (0, 1, 0)
    pixel_measures.PixelSpacing = [0.9, 0.8]
    pixel_measures.SliceThickness = 1.2
    transformation.RescaleSlope, transformation.RescaleIntercept, transformation.RescaleType = 2, -10, "US"
    shared = Dataset()
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [pixel_measures]
    shared.PixelValueTransformationSequence = [transformation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for slice_index in _SLICE_OF_FRAME:
        position, content, item = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [-30.0, round(-20.0 + 1.2 * slice_index, 4), 40.0]
        content.StackID, content.InStackPositionNumber = "1", slice_index + 1
        item.PlanePositionSequence = [position]
        item.FrameContentSequence = [content]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return ds

