"""Nuclei instance segmentation on an overlapping tile grid, merged across tile borders exactly once.

Grid B (nuclei) is separate from the QC grid: square *cores* of ``core_px`` at the detector's resolution,
each read with a ``margin_px`` border on every side. A detector returns a label image for the whole padded
tile; an instance is kept only by the tile whose core contains its centroid (TIAToolbox's margin rule,
hover_net's ``ambiguous_size``), so an instance that straddles two cores is reported once, by one tile,
and every step of the built-in method has a support smaller than the margin.

The built-in detector, :class:`ClassicalNucleusDetector`, is **not a trained model**: Ruifrok colour
deconvolution (hematoxylin channel), background subtraction (grey opening), a fixed OD threshold, hole
filling, and a distance-transform watershed to split touching nuclei; it does not classify. Parameters
mirror QuPath's ``WatershedCellDetection`` defaults (0.5 µm/px, sigma 1.5 µm, background radius 8 µm,
area 10–400 µm²), reimplemented. Published classical pipelines reach a recall of 0.13–0.35 at IoU 0.5 on
MoNuSeg (WSI.md §6.2): use it to test the plumbing and as a CPU fallback, not for diagnosis.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

import cv2
import numpy as np
import shapely
from scipy import ndimage as ndi

from inference.pathology.qc import KEPT, TileQc
from inference.pathology.stain import hematoxylin_od
from inference.pathology.store import NucleusStore
from inference.pathology.tiling import ResolutionReader, ordered_map

__all__ = ["ClassicalNucleusDetector", "ClassicalParams", "DetectorInfo", "NucleiResult", "NucleusDetector",
           "TileInstances", "extract_instances", "run_nuclei"]

UNCLASSIFIED = "Nucleus (unclassified)"


@dataclass(frozen=True)
class DetectorInfo:
    """Who found the nuclei: recorded in the report, the audit trail and every DICOM output."""

    id: str
    name: str
    version: str
    method: str  # "classical" | "network"
    mpp: float  # the resolution it works at
    classes: tuple[str, ...]  # class index i -> name; index 0 is used for "unclassified"
    parameters: dict = field(default_factory=dict)
    licence: str = ""

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "version": self.version, "method": self.method,
                "mpp": self.mpp, "classes": list(self.classes), "parameters": self.parameters,
                "licence": self.licence}


class NucleusDetector(Protocol):
    """A nuclei detector: label images for a batch of RGB tiles, with a class and score per label."""

    info: DetectorInfo
    core_px: int
    margin_px: int
    batch_size: int
    min_solidity: float  # instances less convex than this are dropped (0: keep all)

    def detect(self, tiles: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For each tile: (labels int32 (H, W), class index per label (n+1,), probability per label (n+1,))."""


@dataclass(frozen=True)
class ClassicalParams:
    """Parameters of the built-in method (QuPath-like defaults, µm unless stated)."""

    mpp: float = 0.5
    sigma_um: float = 0.5
    background_radius_um: float = 8.0
    threshold_od: float = 0.25  # on the background-subtracted hematoxylin OD
    min_mean_od: float = 0.5  # mean hematoxylin OD of a kept nucleus
    min_area_um2: float = 10.0
    max_area_um2: float = 400.0
    max_cluster_um2: float = 1200.0  # larger dark regions are tissue (keratin, folds), not nuclear clusters
    min_solidity: float = 0.8
    split_min_distance_um: float = 3.0
    core_px: int = 896
    margin_px: int = 64

    def to_json(self) -> dict:
        return asdict(self)


class ClassicalNucleusDetector:
    """Hematoxylin threshold + distance-transform watershed (see the module docstring: not a trained model)."""

    def __init__(self, params: ClassicalParams = ClassicalParams()) -> None:
        from inference import __version__

        self.params = params
        self.core_px, self.margin_px, self.batch_size = params.core_px, params.margin_px, 1
        self.min_solidity = params.min_solidity
        self.info = DetectorInfo(
            id="classical-watershed", name="Classical nuclei detection (H-channel threshold + watershed; "
            "not a trained model)", version=__version__, method="classical", mpp=params.mpp,
            classes=(UNCLASSIFIED,), parameters=params.to_json(), licence="AGPL-3.0-or-later (this project)")
        um = params.mpp
        r = max(1, round(params.background_radius_um / um))
        self._background_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        d = max(1, round(params.split_min_distance_um / um))
        self._peak_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * d + 1, 2 * d + 1))
        self._open_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))

    def detect(self, tiles: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [self.detect_one(t) for t in tiles]

    def detect_one(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p, um = self.params, self.params.mpp
        h_raw = hematoxylin_od(rgb)
        h = cv2.GaussianBlur(h_raw, (0, 0), p.sigma_um / um) if p.sigma_um > 0 else h_raw
        mask = ((h - self._background(h)) > p.threshold_od).astype(np.uint8)
        mask = cv2.morphologyEx(_fill_holes(mask), cv2.MORPH_OPEN, self._open_kernel)
        n, components, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        too_big = stats[:, cv2.CC_STAT_AREA] * um * um > p.max_cluster_um2
        too_big[0] = False
        if too_big.any():
            mask[too_big[components]] = 0
            components[too_big[components]] = 0
        if not mask.any():
            return np.zeros(mask.shape, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float32)
        labels = self._split(mask, components, stats)
        count = int(labels.max())
        index = np.arange(1, count + 1)
        area = np.bincount(labels.ravel(), minlength=count + 1)[1:] * um * um
        mean_od = np.asarray(ndi.mean(h_raw, labels, index)) if count else np.zeros(0)
        keep = np.zeros(count + 1, bool)
        keep[1:] = (area >= p.min_area_um2) & (area <= p.max_area_um2) & (mean_od >= p.min_mean_od)
        classes = np.zeros(count + 1, np.int32)
        scores = np.where(keep, 1.0, 0.0).astype(np.float32)
        labels[~keep[labels]] = 0
        return labels, classes, scores

    def _background(self, h: np.ndarray) -> np.ndarray:
        """Grey opening (radius ``background_radius_um``) on a 4× reduced image: the background is smooth,
        and the full-resolution opening cost as much as everything else together."""
        small = cv2.resize(h, (max(1, h.shape[1] // 4), max(1, h.shape[0] // 4)), interpolation=cv2.INTER_AREA)
        r = max(1, round(self.params.background_radius_um / self.params.mpp / 4))
        opened = cv2.morphologyEx(small, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
        return cv2.resize(opened, (h.shape[1], h.shape[0]), interpolation=cv2.INTER_LINEAR)

    def _split(self, mask: np.ndarray, components: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """Distance-transform watershed, run only on the components that hold more than one distance peak."""
        from skimage.segmentation import watershed

        distance = cv2.GaussianBlur(cv2.distanceTransform(mask, cv2.DIST_L2, 5), (0, 0), 1.0)
        peaks = (distance >= cv2.dilate(distance, self._peak_kernel)) & (distance > 1.5)
        _, markers = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
        at = markers > 0
        pairs = np.unique(components[at].astype(np.int64) * (int(markers.max()) + 1) + markers[at])
        n_markers = np.bincount(pairs // (int(markers.max()) + 1), minlength=len(stats))
        labels = components.astype(np.int32)
        multi = n_markers > 1
        multi[0] = False
        if multi.any():
            where = multi[components]
            split = watershed(-distance, np.where(where, markers, 0), mask=where).astype(np.int32)
            labels[where] = split[where] + int(components.max())  # marker ids follow the component ids
        return _compact(labels)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes of a binary mask filled: flood the background from a 1-pixel frame, keep what was not reached."""
    h, w = mask.shape
    framed = np.zeros((h + 2, w + 2), np.uint8)
    framed[1:-1, 1:-1] = mask
    flood = framed.copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return (framed | (1 - flood))[1:-1, 1:-1]


def _compact(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n, keeping their order (a bincount, no sort of the pixels)."""
    present = np.nonzero(np.bincount(labels.ravel()))[0]
    present = present[present > 0]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return lut[labels]


@dataclass
class TileInstances:
    """The instances one tile reports (centroid inside its core), in level-0 pixels."""

    x: np.ndarray
    y: np.ndarray
    area_um2: np.ndarray
    class_index: np.ndarray
    probability: np.ndarray
    polygons: list[np.ndarray]


def extract_instances(labels: np.ndarray, classes: np.ndarray, scores: np.ndarray, *, origin: tuple[float, float],
                      scale: float, mpp: float, core: tuple[int, int, int, int], min_solidity: float = 0.0
                      ) -> TileInstances:
    """Polygons, centroids and areas of the labels whose centroid lies in ``core`` (x0, y0, x1, y1; tile px).

    ``origin`` is the tile's top-left in level-0 pixels and ``scale`` level-0 px per tile px. Polygons are
    valid (``shapely.make_valid``, largest part) and simplified to within half a pixel.
    """
    xs, ys, areas, cls, probs, polys = [], [], [], [], [], []
    x0c, y0c, x1c, y1c = core
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        sub = (labels[sl] == i).astype(np.uint8)
        m = cv2.moments(sub, binaryImage=True)
        if m["m00"] == 0:
            continue
        cx, cy = m["m10"] / m["m00"] + sl[1].start, m["m01"] / m["m00"] + sl[0].start
        if not (x0c <= cx < x1c and y0c <= cy < y1c):
            continue
        contours, _ = cv2.findContours(sub, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        contour = max(contours, key=cv2.contourArea)
        if min_solidity > 0:
            hull = cv2.contourArea(cv2.convexHull(contour))
            if hull <= 0 or m["m00"] / hull < min_solidity:
                continue
        contour = cv2.approxPolyDP(contour, 0.5, True).reshape(-1, 2).astype(np.float64)
        if len(contour) < 3:
            w, h = sub.shape[1], sub.shape[0]
            contour = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)
        contour[:, 0] += sl[1].start + 0.5
        contour[:, 1] += sl[0].start + 0.5
        xs.append(cx + 0.5)
        ys.append(cy + 0.5)
        areas.append(m["m00"] * mpp * mpp)
        cls.append(int(classes[i]) if i < len(classes) else 0)
        probs.append(float(scores[i]) if i < len(scores) else 1.0)
        polys.append(contour)
    polys = _valid_polygons(polys)
    ox, oy = origin
    return TileInstances(
        x=np.asarray(xs) * scale + ox, y=np.asarray(ys) * scale + oy, area_um2=np.round(np.asarray(areas), 3),
        class_index=np.asarray(cls, np.int32), probability=np.asarray(probs, np.float32),
        polygons=[(p * scale + (ox, oy)).astype(np.float32) for p in polys])


def _valid_polygons(polygons: list[np.ndarray]) -> list[np.ndarray]:
    """QuPath 0.6 rejects self-touching rings ("Reduction failed"): repair with make_valid, keep the largest part."""
    if not polygons:
        return polygons
    closed = [np.vstack([p, p[:1]]) for p in polygons]
    rings = shapely.linearrings(np.concatenate(closed), indices=np.repeat(np.arange(len(closed)),
                                                                          [len(c) for c in closed]))
    geoms = shapely.polygons(rings)
    bad = np.nonzero(~shapely.is_valid(geoms))[0]
    for i in bad:
        fixed = shapely.make_valid(geoms[i])
        parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type == "Polygon" and g.area > 0]
        if parts:
            ring = np.asarray(max(parts, key=lambda g: g.area).exterior.coords)[:-1]
            polygons[i] = ring
        else:  # degenerate sliver: its convex hull
            hull = shapely.convex_hull(geoms[i])
            polygons[i] = np.asarray(hull.exterior.coords)[:-1] if hull.geom_type == "Polygon" else polygons[i]
    return polygons


@dataclass
class NucleiResult:
    """Counts per QC-grid tile and class, and what was processed."""

    counts: np.ndarray  # int32 (rows, cols, n_classes) on the QC grid
    tiles_processed: int
    tiles_possible: int
    total: int
    mpp: float  # resolution the detector actually saw
    seconds: float = 0.0


def run_nuclei(slide, slide_mpp: float, detector: NucleusDetector, qc: TileQc, store: NucleusStore, *,
               workers: int = 2, progress: Callable[[float], None] | None = None) -> NucleiResult:
    """Detect nuclei in the kept QC tiles, tile by tile, into ``store``; count them on the QC grid.

    A nucleus counts (and is stored) only when its centroid falls in a kept QC tile, so densities are
    counts over the kept tissue area.
    """
    import time

    t0 = time.perf_counter()
    reader = ResolutionReader(slide, slide_mpp, detector.info.mpp)
    grid = qc.grid
    kept = qc.status == KEPT
    core_l0 = detector.core_px * reader.scale
    margin = detector.margin_px
    cols_b = math.ceil(grid.width / core_l0)
    rows_b = math.ceil(grid.height / core_l0)
    jobs = []
    for rb in range(rows_b):
        for cb in range(cols_b):
            x0, y0 = cb * core_l0, rb * core_l0
            c0, c1 = int(x0 // grid.step), min(grid.cols, math.ceil((x0 + core_l0) / grid.step))
            r0, r1 = int(y0 // grid.step), min(grid.rows, math.ceil((y0 + core_l0) / grid.step))
            if c1 > c0 and r1 > r0 and kept[r0:r1, c0:c1].any():
                jobs.append((x0, y0))
    n_classes = len(detector.info.classes)
    counts = np.zeros((grid.rows, grid.cols, n_classes), np.int32)
    solidity = detector.min_solidity
    size = detector.core_px + 2 * margin

    def read(origin: tuple[float, float]) -> np.ndarray:
        x0, y0 = origin
        return reader.read(x0 - margin * reader.scale, y0 - margin * reader.scale, size, size)

    batches = [jobs[i:i + detector.batch_size] for i in range(0, len(jobs), detector.batch_size)]

    def process(batch: list[tuple[float, float]]) -> list[TileInstances]:
        pixels = [read(origin) for origin in batch]
        results = detector.detect(pixels)
        out = []
        for (x0, y0), (labels, classes, scores) in zip(batch, results):
            out.append(extract_instances(labels, classes, scores, origin=(x0 - margin * reader.scale,
                                                                         y0 - margin * reader.scale),
                                         scale=reader.scale, mpp=reader.mpp,
                                         core=(margin, margin, margin + detector.core_px, margin + detector.core_px),
                                         min_solidity=solidity))
        return out

    done = 0
    # networks batch on their own device; the classical method runs one tile per thread
    threads = workers if detector.batch_size == 1 else 1
    for instances_list in ordered_map(process, batches, workers=threads):
        for inst in instances_list:
            if len(inst.x):
                col = np.minimum((inst.x // grid.step).astype(np.int64), grid.cols - 1)
                row = np.minimum((inst.y // grid.step).astype(np.int64), grid.rows - 1)
                inside = (inst.x < grid.cols * grid.step) & (inst.y < grid.rows * grid.step)
                ok = inside & kept[row, col]
                idx = np.nonzero(ok)[0]
                np.add.at(counts, (row[idx], col[idx], inst.class_index[idx]), 1)
                store.add(inst.x[idx], inst.y[idx], inst.area_um2[idx], inst.class_index[idx],
                          inst.probability[idx], [inst.polygons[i] for i in idx])
            done += 1
            if progress and (done % 4 == 0 or done == len(jobs)):
                progress(done / max(1, len(jobs)))
    store.commit()
    return NucleiResult(counts, len(jobs), rows_b * cols_b, int(counts.sum()), reader.mpp,
                        time.perf_counter() - t0)
