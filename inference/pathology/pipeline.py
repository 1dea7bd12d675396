"""A slide analysis as two stages of plain steps, testable without Orthanc.

- :func:`run_qc_stage`: open → overview, thumbnail, tissue mask → QC tiles (grid A) → slide QC decision;
- :func:`run_analysis_stage`: nuclei (grid B, streamed to an on-disk store) → aggregation → heatmap.

The two stages are separate jobs for the plugin (``qc`` then ``running``), so a cheap QC can run on any
worker and the nuclei stage on a GPU worker. :func:`analyse_slide` runs both in one go (benchmarks, tests).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from inference.pathology import qc as Q
from inference.pathology.aggregation import AggregationParams, SlideFigures, aggregate
from inference.pathology.heatmap import encode_png, render_heatmap
from inference.pathology.nuclei import ClassicalNucleusDetector, NucleiResult, NucleusDetector, run_nuclei
from inference.pathology.reader import Slide, SlideError
from inference.pathology.store import NucleusStore
from inference.pathology.tiling import ResolutionReader, TileGrid, blocks_of, mask_fraction_per_tile, ordered_map
from inference.pathology.tissue import (TissueMaskParams, mask_png_image, overview_size, read_overview, thumbnail,
                                        tissue_mask, um_per_overview_px)

log = logging.getLogger("inference.pathology")

__all__ = ["AnalysisOutcome", "MissingMpp", "QcOutcome", "SlideSettings", "analyse_slide", "load_detector",
           "run_analysis_stage", "run_qc_stage"]

Progress = Callable[[float, str], None]


class MissingMpp(SlideError):
    """The slide does not state its pixel size and none was declared."""


@dataclass(frozen=True)
class SlideSettings:
    """How to analyse a slide: sent by the plugin with each claim (``AI.Pathology`` + upload fields)."""

    declared_mpp: float | None = None  # used only when the slide does not state its own pixel size
    nuclei_model: str = "classical-watershed"  # or a folder holding a HoVerNet MONAI bundle
    workers: int = 2
    qc: Q.QcParams = Q.QcParams()
    tissue: TissueMaskParams = TissueMaskParams()
    aggregation: AggregationParams = AggregationParams()
    device: str | None = None  # torch device for network models; None: CUDA when present

    @classmethod
    def from_json(cls, data: dict | None) -> "SlideSettings":
        data = data or {}
        qc = replace(Q.QcParams(), **{k: v for k, v in (data.get("qc") or {}).items()
                                      if k in Q.QcParams.__dataclass_fields__})
        tissue = replace(TissueMaskParams(), **{k: v for k, v in (data.get("tissue") or {}).items()
                                               if k in TissueMaskParams.__dataclass_fields__})
        aggregation = replace(AggregationParams(), **{k: v for k, v in (data.get("aggregation") or {}).items()
                                                     if k in AggregationParams.__dataclass_fields__})
        mpp = data.get("declared_mpp")
        return cls(declared_mpp=float(mpp) if mpp else None,
                   nuclei_model=str(data.get("nuclei_model") or "classical-watershed"),
                   workers=int(data.get("workers") or 2), qc=qc, tissue=tissue, aggregation=aggregation,
                   device=data.get("device"))


@dataclass
class QcOutcome:
    """What the QC stage found: everything the report, the plugin and the analysis stage need."""

    metadata: dict
    mpp: float | None
    mpp_source: str  # "slide" | "declared" | "missing"
    thumbnail: np.ndarray
    mask_png: bytes
    tiles: Q.TileQc | None
    slide_qc: Q.SlideQc | None
    tissue_info: dict
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # set when the stage ends the slide (failed/empty)

    @property
    def tile_counts(self) -> dict:
        if self.tiles is None:
            return {}
        counts = self.tiles.counts()
        return {"possible": self.tiles.grid.possible, "extracted": counts["kept"],
                "filtered": {"background": counts["background"], "low_tissue": counts["low_tissue"],
                             "blurry": counts["blurry"]}}

    def state(self) -> dict:
        """JSON the plugin keeps and hands to the analysis stage."""
        return {"metadata": self.metadata, "mpp": self.mpp, "mpp_source": self.mpp_source,
                "tiles": Q.tile_state(self.tiles) if self.tiles else None, "tile_counts": self.tile_counts,
                "tile_grid": self.tiles.grid.to_json() if self.tiles else None,
                "quality_control": self.slide_qc.to_json() if self.slide_qc else None,
                "tissue_mask": self.tissue_info, "timings": self.timings}


def _timed(timings: dict, name: str, started: float) -> None:
    timings[name] = round(time.perf_counter() - started, 4)
    log.info("stage %s: %.2f s", name, timings[name])


def slide_mpp(slide: Slide, settings: SlideSettings) -> tuple[float | None, str]:
    if slide.metadata.mpp_x:
        return slide.metadata.mpp_x, "slide"
    if settings.declared_mpp:
        return settings.declared_mpp, "declared"
    return None, "missing"


def run_qc_stage(slide: Slide, settings: SlideSettings = SlideSettings(), progress: Progress | None = None
                 ) -> QcOutcome:
    """Thumbnail, tissue mask, QC tiles and the slide QC decision (streamed, blocks on a thread pool)."""
    report = progress or (lambda f, m: None)
    timings: dict[str, float] = {}
    meta = slide.metadata
    mpp, source = slide_mpp(slide, settings)
    metadata = {**meta.to_json(), "mpp_source": source}
    if source == "declared":
        metadata.update(mpp_x=mpp, mpp_y=mpp, width_mm=round(meta.width * mpp / 1000, 4),
                        height_mm=round(meta.height * mpp / 1000, 4))

    t = time.perf_counter()
    report(0.02, "reading the overview")
    overview = read_overview(slide, overview_size(meta.width, meta.height, mpp, settings.tissue))
    thumb = thumbnail(overview)
    _timed(timings, "thumbnail", t)

    t = time.perf_counter()
    mask, info = tissue_mask(overview.image, um_per_overview_px(overview, mpp), settings.tissue)
    mask_png = encode_png(mask_png_image(mask, (thumb.shape[1], thumb.shape[0])))
    _timed(timings, "tissue_mask", t)
    mask_ratio = float(mask.mean())
    if mpp is None:
        return QcOutcome(metadata, None, source, thumb, mask_png, None, None, info, timings,
                         error="the slide does not state its pixel size (microns per pixel): upload it again with "
                               "the form field mpp (e.g. mpp=0.25), or set AI.Pathology.DefaultMpp")

    t = time.perf_counter()
    tiles = qc_tiles(slide, mpp, mask, overview.scale_x, overview.scale_y, info, settings,
                     lambda f: report(0.05 + 0.9 * f, "quality control of tiles"))
    _timed(timings, "qc_tiles", t)
    warnings = list(meta.warnings)
    if source == "declared":
        warnings.append(f"the slide does not state its pixel size; the declared {mpp} µm/px was used")
    slide_area = meta.width * meta.height * (mpp / 1000) ** 2
    decision = Q.decide(tiles, mask_ratio, slide_area, settings.qc, warnings)
    error = None
    if decision.status in ("fail", "empty"):
        error = decision.reason
    return QcOutcome(metadata, mpp, source, thumb, mask_png, tiles, decision, info, timings, error)


def qc_tiles(slide: Slide, mpp: float, mask: np.ndarray, scale_x: float, scale_y: float, mask_info: dict,
             settings: SlideSettings, progress: Callable[[float], None]) -> Q.TileQc:
    """Grid A: candidate tiles from the mask, read in blocks at the nearest level, measured block by block."""
    params = settings.qc
    reader = ResolutionReader(slide, mpp, params.tile_mpp)
    grid = TileGrid.for_reader(reader, slide.metadata.width, slide.metadata.height, params.tile_px)
    tiles = Q.TileQc.empty(grid)
    candidates = mask_fraction_per_tile(grid, mask, scale_x, scale_y) >= params.candidate_mask_fraction
    blocks = blocks_of(candidates, params.block_tiles)
    sat_threshold = int(mask_info["saturation_threshold"])
    grey_threshold = float(mask_info["glass_grey_level"]) - settings.tissue.glass_margin
    t = params.tile_px

    every = max(1, len(blocks) // 48)  # stain pixels from ≈ 48 blocks spread over the slide: enough, and cheap

    def measure(item):
        i, block = item
        x0, y0 = grid.origin(block.row, block.col)
        pixels = reader.read(x0, y0, block.n_cols * t, block.n_rows * t)
        sub = candidates[block.row:block.row + block.n_rows, block.col:block.col + block.n_cols]
        return block, Q.measure_block(pixels, block, t, sub, sat_threshold, grey_threshold, params,
                                      sample=i % every == 0)

    for i, (block, (ratio, lap, status, sample)) in enumerate(ordered_map(measure, enumerate(blocks),
                                                                          settings.workers)):
        tiles.add(block, ratio, lap, status, sample)
        if i % 8 == 0:
            progress((i + 1) / max(1, len(blocks)))
    return tiles


def load_detector(settings: SlideSettings) -> NucleusDetector:
    """The classical method, or a HoVerNet MONAI bundle from a folder."""
    if settings.nuclei_model in ("", "classical-watershed"):
        return ClassicalNucleusDetector()
    from inference.pathology.hovernet import HoVerNetDetector

    return HoVerNetDetector.from_bundle(Path(settings.nuclei_model), device=settings.device)


@dataclass
class AnalysisOutcome:
    nuclei: NucleiResult
    figures: SlideFigures
    heatmap_png: bytes
    detector: dict
    store_path: Path
    warnings: list[str]
    timings: dict[str, float] = field(default_factory=dict)


def run_analysis_stage(slide: Slide, mpp: float, tiles: Q.TileQc, thumb: np.ndarray, workdir: Path,
                       settings: SlideSettings = SlideSettings(), progress: Progress | None = None,
                       detector: NucleusDetector | None = None) -> AnalysisOutcome:
    """Nuclei into ``workdir/nuclei.sqlite``, then counts, densities, hotspots and the heatmap."""
    report = progress or (lambda f, m: None)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    detector = detector or load_detector(settings)
    warnings = []
    if mpp > detector.info.mpp * 1.5:
        warnings.append(f"the slide ({mpp:.3g} µm/px) is coarser than the nuclei model's {detector.info.mpp:g} "
                        f"µm/px: tiles were upsampled, expect fewer nuclei found (at 20x, published models "
                        f"lose about a quarter of their recall)")
    _timed(timings, "load_model", t)
    t = time.perf_counter()
    store = NucleusStore(Path(workdir) / "nuclei.sqlite")
    try:
        nuclei = run_nuclei(slide, mpp, detector, tiles, store, workers=settings.workers,
                            progress=lambda f: report(0.05 + 0.85 * f, "segmenting nuclei"))
    finally:
        store.close()
    _timed(timings, "nuclei", t)
    t = time.perf_counter()
    report(0.92, "aggregating")
    figures = aggregate(nuclei.counts, tiles, detector.info.classes, mpp, settings.aggregation)
    grid = tiles.grid
    heat = render_heatmap(thumb, figures.density_grid, (grid.cols * grid.step, grid.rows * grid.step),
                          (grid.width, grid.height), rois=figures.regions_of_interest)
    _timed(timings, "aggregation", t)
    return AnalysisOutcome(nuclei, figures, encode_png(heat), detector.info.to_json(), Path(workdir) / "nuclei.sqlite",
                           warnings, timings)


def analyse_slide(slide: Slide, workdir: Path, settings: SlideSettings = SlideSettings(),
                  detector: NucleusDetector | None = None) -> tuple[QcOutcome, AnalysisOutcome | None]:
    """Both stages in one process (benchmarks and tests); the analysis is skipped when QC ends the slide."""
    qc = run_qc_stage(slide, settings)
    if qc.error or qc.tiles is None or qc.mpp is None:
        return qc, None
    return qc, run_analysis_stage(slide, qc.mpp, qc.tiles, qc.thumbnail, workdir, settings, detector=detector)

