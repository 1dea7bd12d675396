"""Who wrote a result, and under which UIDs: constants and deterministic UIDs shared by every result writer."""

from __future__ import annotations

import json
import uuid

from pydicom.uid import UID

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
