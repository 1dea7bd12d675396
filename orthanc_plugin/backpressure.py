"""Back-pressure and off-peak scheduling: which job priorities workers may claim right now.

Incoming C-STOREs are never refused (a study must never be lost); instead, when the disk is nearly full or
the queue is too long, low-priority jobs wait, and ``off-peak`` jobs only run in the off-peak hours.
``/ai/health`` says why.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, time as dtime
from pathlib import Path
from typing import Callable

from orthanc_plugin.rules import PRIORITIES


def parse_hours(text: str) -> tuple[dtime, dtime]:
    """'20:00-07:00' → (start, end); the window may wrap past midnight."""
    try:
        start, end = (datetime.strptime(part.strip(), "%H:%M").time() for part in text.split("-"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time window like '20:00-07:00'") from None
    return start, end


def in_window(now: dtime, window: tuple[dtime, dtime]) -> bool:
    start, end = window
    return start <= now < end if start < end else (now >= start or now < end)


@dataclass
class ClaimPolicy:
    storage: Path
    min_free_percent: float = 5.0
    max_queue: int = 1000
    off_peak: tuple[dtime, dtime] | None = None
    disk_usage: Callable[[Path], tuple[int, int, int]] = shutil.disk_usage

    def state(self, queued: int, now: datetime | None = None) -> dict:
        """{'min_priority': int | None, 'reasons': [...], 'off_peak_open': bool}"""
        now = now or datetime.now()
        reasons = []
        try:
            total, _, free = self.disk_usage(self.storage)
            free_percent = 100.0 * free / total if total else 100.0
            if free_percent < self.min_free_percent:
                reasons.append(f"disk {self.storage} has {free_percent:.1f} % free (< {self.min_free_percent:g} %): "
                               "only urgent and manual jobs run")
        except OSError as exc:
            reasons.append(f"cannot read disk usage of {self.storage}: {exc}")
        if queued > self.max_queue:
            reasons.append(f"{queued} jobs queued (> {self.max_queue}): only urgent and manual jobs run")
        off_peak_open = self.off_peak is None or in_window(now.time(), self.off_peak)
        if reasons:
            min_priority: int | None = PRIORITIES["normal"] + 1
        elif not off_peak_open:
            min_priority = PRIORITIES["normal"]
        else:
            min_priority = None
        return {"active": bool(reasons), "reasons": reasons, "min_priority": min_priority,
                "off_peak_open": off_peak_open}
