"""Nuclei: the built-in classical method finds the drawn nuclei, each exactly once across tile borders,
with valid polygons, the same way every run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tiffslide", reason="the slide readers are not installed: run `make test`")

from scipy.spatial import cKDTree  # noqa: E402

from inference.pathology.nuclei import ClassicalNucleusDetector, ClassicalParams, run_nuclei  # noqa: E402
from inference.pathology.pipeline import SlideSettings, run_qc_stage  # noqa: E402
from inference.pathology.qc import KEPT  # noqa: E402
from inference.pathology.reader import open_slide  # noqa: E402
from inference.pathology.store import NucleusStore  # noqa: E402
from inference.pathology.synthetic import nuclei_truth, write_synthetic_slide  # noqa: E402

SIZE = 3072


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nuclei")
    path = write_synthetic_slide(folder / "s.tif", SIZE)
    with open_slide(path) as slide:
        qc = run_qc_stage(slide, SlideSettings(workers=1))
    return path, qc, folder


def _run(path: Path, qc, folder: Path, detector, name: str) -> tuple[np.ndarray, NucleusStore]:
    store = NucleusStore(folder / f"{name}.sqlite")
    with open_slide(path) as slide:
        result = run_nuclei(slide, 0.25, detector, qc.tiles, store, workers=2)
    assert result.total == len(store)
    points = np.array([(n.x, n.y) for n in store.iter()])
    return points, store


def test_finds_the_drawn_nuclei_once(prepared):
    path, qc, folder = prepared
    points, store = _run(path, qc, folder, ClassicalNucleusDetector(), "default")
    truth = nuclei_truth(SIZE)
    grid = qc.tiles.grid
    col, row = (truth[:, 0] // grid.step).astype(int), (truth[:, 1] // grid.step).astype(int)
    inside = (col < grid.cols) & (row < grid.rows)
    inside[inside] &= qc.tiles.status[row[inside], col[inside]] == KEPT
    expected = truth[inside, :2]
    distance, _ = cKDTree(expected).query(points)
    precision = (distance < 3).mean()
    recall = (cKDTree(points).query(expected)[0] < 3).mean()
    assert precision > 0.97 and recall > 0.97, (precision, recall, len(points), len(expected))
    assert not cKDTree(points).query_pairs(4)  # no nucleus reported twice
    import shapely

    for nucleus in store.iter():
        assert len(nucleus.polygon) >= 3
        assert shapely.Polygon(nucleus.polygon).is_valid
        assert 10 <= nucleus.area_um2 <= 400
    store.close()


def test_small_tiles_give_the_same_nuclei_as_large_ones(prepared):
    """Four times as many tile borders, same instances: the margin rule merges them exactly once."""
    path, qc, folder = prepared
    large, s1 = _run(path, qc, folder, ClassicalNucleusDetector(), "large")
    small, s2 = _run(path, qc, folder, ClassicalNucleusDetector(replace(ClassicalParams(), core_px=224)), "small")
    s1.close(), s2.close()
    assert len(small) == len(large)
    distance, _ = cKDTree(large).query(small)
    assert (distance < 0.01).all()


def test_runs_are_identical(prepared):
    path, qc, folder = prepared
    a, s1 = _run(path, qc, folder, ClassicalNucleusDetector(), "a")
    b, s2 = _run(path, qc, folder, ClassicalNucleusDetector(), "b")
    assert np.array_equal(a, b)
    assert [n.polygon.tobytes() for n in s1.iter()] == [n.polygon.tobytes() for n in s2.iter()]
    s1.close(), s2.close()
