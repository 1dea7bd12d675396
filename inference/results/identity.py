"""Who wrote a result, and under which UIDs: constants and deterministic UIDs shared by every result writer."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import UID

if TYPE_CHECKING:
    from inference.models.base import ModelInfo, SegmentDescription
    from inference.volume import Volume

MANUFACTURER = "Orthanc AI"
"""Manufacturer (0008,0070) of every object we write, and of our Contributing Equipment item."""

DEVICE_SERIAL_NUMBER = "orthanc-ai"
"""Device Serial Number (0018,1000): the software is the device, so one stable value for all installations."""

SERIES_DESCRIPTION_PREFIX = "AI "
"""Every result series description starts with this, so people and routing rules can tell results apart."""

# Namespace of our name-based UUIDs; fixed forever, or re-running a job would mint different UIDs.
_UID_NAMESPACE = uuid.UUID("7c1e5a52-4f0e-5b8e-9a51-0a7d1c3e2f60")


def derived_uid(*parts: str) -> str:
    """A UID determined by ``parts`` (e.g. source series UID, model id, version, result kind).

    A name-based (SHA-1, version 5) UUID under the 2.25 root (PS3.5 B.2), so writing the same result
    twice yields the same UIDs and never a silent duplicate in Orthanc.
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part to derive the UID from.")
    name = json.dumps([str(part) for part in parts], separators=(",", ":"))  # unambiguous join
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


def series_description(name: str, *, demonstration: bool = False) -> str:
    """Series Description (LO, 64 chars) for a result: always starts with "AI ", and "AI DEMO " for demos."""
    text = " ".join(name.split())
    if text.upper().startswith(SERIES_DESCRIPTION_PREFIX):
        text = text[len(SERIES_DESCRIPTION_PREFIX) :].lstrip()
    if demonstration and not text.upper().startswith("DEMO "):
        text = f"DEMO {text}"
    return f"{SERIES_DESCRIPTION_PREFIX}{text}".rstrip()[:64]


PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment
"""(109102, DCM) Purpose of Reference of the Contributing Equipment item that names the model."""


def lo(text: str, length: int = 64) -> str:
    """A value fit for a LO/SH-like string: one line, at most ``length`` characters."""
    return " ".join(str(text).split())[:length]


def contribution_description(model: ModelInfo, what: str) -> str:
    """Contribution Description (ST, 1024 chars): what the model did, what it is, trained on, how good."""
    parts = [f"{what} by {model.name} {model.version} ({model.id})."]
    if model.demonstration:
        parts.append("Demonstration model, not for diagnosis.")
    parts += [text.strip() for text in (model.description, model.trained_on, model.accuracy) if text.strip()]
    return " ".join(parts)[:1024]


def contributing_equipment(model: ModelInfo, what: str):
    """The highdicom Contributing Equipment item (DCM 109102 "Processing Equipment") naming the model."""
    import highdicom as hd  # imported here: the rest of this module stays light
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=PROCESSING_EQUIPMENT, manufacturer_model_name=lo(model.id),
        software_versions=lo(model.version), device_serial_number=DEVICE_SERIAL_NUMBER,
        contribution_description=contribution_description(model, what))


def check_label_map(volume: Volume, labels: np.ndarray, segments: Sequence[SegmentDescription], what: str) -> None:
    """Every writer's rule for a label map: integers on the volume grid, distinct positive labels, every
    value described by a segment."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"Label map must hold integers (uint8 labels), got {labels.dtype}.")
    if labels.shape != volume.array.shape:
        raise ValueError(f"Label map shape {labels.shape} differs from the volume shape {volume.array.shape}.")
    if not segments:
        raise ValueError(f"{what} needs at least one segment description.")
    label_values = [segment.label for segment in segments]
    if len(set(label_values)) != len(label_values) or min(label_values) < 1:
        raise ValueError(f"Segment labels must be distinct positive integers, got {label_values}.")
    undescribed = sorted(set(np.unique(labels).tolist()) - {0, *label_values})
    if undescribed:
        raise ValueError(f"Label map holds values {undescribed} that no segment description covers.")
