"""Findings: what the result writers (SR, PDF, RTSTRUCT) report about a label map.

A :class:`Finding` is one lesion (one connected component of one segment) with its measurements in
physical units on the source grid. ``measure_findings`` is implemented in ``inference/results/measurements.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Finding:
    """One lesion: a connected component of segment ``segment_label``."""

    number: int                      # 1-based, ordered by decreasing volume
    segment_label: int               # label value in the label map (SEG segment number: extra["segment_number"])
    segment_name: str
    tracking_uid: str                # deterministic UID (study, model, series, segment, component)
    tracking_id: str                 # human-readable, e.g. "Lesion 1"
    voxel_count: int
    volume_ml: float
    max_3d_diameter_mm: float
    longest_axial_diameter_mm: float
    perpendicular_axial_diameter_mm: float
    mean_intensity: float
    centroid_mm: tuple[float, float, float]            # patient LPS coordinates
    centroid_index: tuple[float, float, float]         # (slice k, row j, column i) in the volume
    key_slice: int                                     # slice index with the largest area of the finding
    location: str = ""                                 # finding site text when known ("" = unknown)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ResultObjects:
    """SOP Instance UIDs of the objects one job wrote, for the job's outputs."""

    seg: str | None = None
    rtstruct: str | None = None
    sr: str | None = None
    pdf: str | None = None

    def uids(self) -> list[str]:
        return [u for u in (self.seg, self.rtstruct, self.sr, self.pdf) if u]
