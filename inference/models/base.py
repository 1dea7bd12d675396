"""Types shared by every model: what a model is, what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from inference.volume import Volume


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM Code Sequence item)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SegmentDescription:
    """One label of a label map: what it is, how it is coded and shown."""

    label: int
    name: str
    category: Code
    type: Code
    color: tuple[int, int, int]  # sRGB 0-255, converted to CIELab by the SEG writer
    algorithm_type: str = "AUTOMATIC"


@dataclass(frozen=True)
class ModelInfo:
    """Identity and honest description of a model, carried into every result it produces."""

    id: str
    name: str
    version: str
    task: str
    modality: str
    segments: tuple[SegmentDescription, ...]
    description: str = ""
    trained_on: str = ""
    accuracy: str = ""
    demonstration: bool = False


@dataclass
class SegmentationResult:
    """A label map on the grid of the input volume (same shape as ``volume.array``)."""

    labels: np.ndarray  # uint8, values are SegmentDescription.label or 0
    notes: list[str] = field(default_factory=list)


ProgressCallback = Callable[[float], None]


class SegmentationModel(Protocol):
    info: ModelInfo

    def segment(self, volume: Volume, progress: ProgressCallback) -> SegmentationResult: ...


class InputNotSupported(Exception):
    """The input is valid DICOM but not something this model can process (job ends 'skipped')."""
