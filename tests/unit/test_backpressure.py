"""Back-pressure and off-peak hours decide which priorities may be claimed."""

from datetime import datetime

import pytest

from orthanc_plugin import jobs as J
from orthanc_plugin.backpressure import ClaimPolicy, in_window, parse_hours
from orthanc_plugin.rules import MANUAL_PRIORITY, PRIORITIES


def policy(free_percent=50.0, **kw):
    return ClaimPolicy(storage="/", disk_usage=lambda p: (100, 100 - free_percent, free_percent), **kw)


def test_no_pressure_everything_runs():
    assert policy().state(queued=3)["min_priority"] is None


def test_full_disk_or_long_queue_lets_only_urgent_and_manual_run():
    for state in (policy(free_percent=2).state(3), policy(max_queue=10).state(11)):
        assert state["active"] and state["reasons"]
        assert PRIORITIES["normal"] < state["min_priority"] <= min(MANUAL_PRIORITY, PRIORITIES["urgent"])


def test_off_peak_window_wraps_midnight():
    window = parse_hours("20:00-07:00")
    assert in_window(datetime(2026, 1, 1, 23, 0).time(), window)
    assert in_window(datetime(2026, 1, 1, 6, 59).time(), window)
    assert not in_window(datetime(2026, 1, 1, 12, 0).time(), window)
    day = policy(off_peak=window).state(0, now=datetime(2026, 1, 1, 12, 0))
    assert day["min_priority"] == PRIORITIES["normal"] and not day["off_peak_open"]
    assert policy(off_peak=window).state(0, now=datetime(2026, 1, 1, 22, 0))["min_priority"] is None
    with pytest.raises(ValueError):
        parse_hours("evening")


def test_store_claim_respects_min_priority(tmp_path):
    store = J.JobStore(tmp_path / "j.sqlite")
    low = store.enqueue(store.create(J.NewJob("1", "s", "1.1", "x", "m", "1", priority=PRIORITIES["off-peak"]))["id"])
    assert store.claim("w", min_priority=PRIORITIES["normal"]) is None
    assert store.claim("w")["id"] == low["id"]
    store.close()
