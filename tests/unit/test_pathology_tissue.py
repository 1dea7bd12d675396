"""Thumbnail and tissue mask: tissue found, glass and pen marks left out, an empty slide stays empty."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("tiffslide", reason="the slide readers are not installed: run `make test`")

from inference.pathology.reader import open_slide  # noqa: E402
from inference.pathology.synthetic import _BLOBS, _tissue, write_synthetic_slide  # noqa: E402
from inference.pathology.tissue import (TissueMaskParams, overview_size, read_overview, thumbnail,  # noqa: E402
                                        tissue_mask)


def test_mask_matches_the_drawn_tissue(tmp_path):
    with open_slide(write_synthetic_slide(tmp_path / "s.tif", 4096)) as slide:
        size = overview_size(4096, 4096, 0.25, TissueMaskParams())
        assert size == (1024, 1024)  # 4 µm/px would be 256 px: never under the thumbnail size
        overview = read_overview(slide, size)
        assert overview.level == 2  # the 4x level, not level 0
        mask, info = tissue_mask(overview.image, overview.scale_x * 0.25)
    ys, xs = np.mgrid[0:1024, 0:1024]
    truth = _tissue((xs + 0.5) * 4, (ys + 0.5) * 4, 4096, 4096, _BLOBS)
    agreement = (mask == truth).mean()
    assert agreement > 0.97, (agreement, info)
    thumb = thumbnail(overview)
    assert thumb.shape == (1024, 1024, 3)


def test_empty_slide_has_no_tissue(tmp_path):
    with open_slide(write_synthetic_slide(tmp_path / "e.tif", 2048, empty=True)) as slide:
        overview = read_overview(slide, (1024, 1024))
    mask, _ = tissue_mask(overview.image, 2.0 * 0.25)
    assert not mask.any()


def test_pen_marks_are_excluded():
    img = np.full((600, 600, 3), 245, np.uint8)
    cv2.circle(img, (200, 300), 150, (230, 150, 210), -1)  # pink tissue
    cv2.line(img, (420, 50), (420, 550), (30, 160, 60), 25)  # green marker on the glass
    cv2.line(img, (100, 300), (300, 300), (25, 45, 150), 12)  # dark blue marker across the tissue
    mask, info = tissue_mask(img, 8.0)
    assert not mask[:, 400:440].any()
    assert mask[200:260, 150:250].mean() > 0.9 and not mask[300, 200]
    assert info["pen_fraction"] > 0.02


def test_thumbnail_is_never_enlarged():
    from inference.pathology.tissue import Overview

    small = Overview(np.zeros((300, 200, 3), np.uint8), 1.0, 1.0, 0)
    assert thumbnail(small).shape == (300, 200, 3)
    big = Overview(np.zeros((3000, 2000, 3), np.uint8), 1.0, 1.0, 0)
    assert thumbnail(big).shape == (1024, 683, 3)
