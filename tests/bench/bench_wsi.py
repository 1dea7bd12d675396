"""Whole-slide benchmark (issue 8): not a timed test. Run ``python -m tests.bench.bench_wsi`` (``make bench``).

On a synthetic 40 000 × 40 000 px pyramidal TIFF (0.25 µm/px, 256 px JPEG tiles, generated once into
``var/bench-data/``, tile by tile):

1. tiling + QC throughput against the raw read rate of the same blocks with the fastest reader alone,
   all on 2 threads, alternated 7 times in one process (raw direct, raw tiffslide, QC; medians; the ratio
   is what counts on a shared host; the same ratio in process CPU seconds, which other tenants of the host
   disturb less, is reported beside it). Two raw readers are timed: the reader's direct tile path (tifffile's
   decoder on each tile, what the pipeline uses) and tiffslide's own ``read_region``; the reference is
   whichever is faster in this run, and the ratio is QC over that reader in the same round. At the nearest
   level (what the pipeline does; with the previous code's QC timed in the same rounds, for the before/after)
   and forced to level 0 + resize (the research notes' setup, ~280 tiles/s per core);
2. the whole analysis (QC, classical nuclei, aggregation, heatmap, GeoJSON, DICOM bulk annotations) in a
   child process: nuclei per second and that process's peak RSS;
3. the HoVer-Net path on CPU (random weights, MONAI's architecture): output megapixels per second, turned
   into nuclei per second with the density the classical method found;
4. an extrapolation to the seed targets (2 GB slide < 15 min, 500 MB < 5 min on one GPU).

Writes ``var/bench-wsi.json``. ``--size`` changes the slide (``--size 8000`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("AI_SHARED_DATA", REPO.parent / "shared" / "data"))
OUT = REPO / "var" / "bench-wsi.json"
ROUNDS = 7


def _summary(rounds: list[dict]) -> dict:
    """Medians over alternated rounds; the reference is the raw reader with the higher median rate, and each
    round's ratio is QC over that reader's rate in the same round."""
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    fastest = max(("direct", "tiffslide"), key=lambda k: med[k])
    ratios = [r["qc"] / r[fastest] for r in rounds]
    cpu_ratios = [r[f"{fastest}_cpu_s"] / r["qc_cpu_s"] for r in rounds]
    return {"reference_reader": fastest, "raw_tiles_per_s": round(med[fastest], 1),
            "raw_tiles_per_s_by_reader": {"direct": round(med["direct"], 1), "tiffslide": round(med["tiffslide"], 1)},
            "qc_tiles_per_s": round(med["qc"], 1), "qc_tiles_per_s_per_core": round(med["qc"] / 2, 1),
            "ratio": round(statistics.median(ratios), 3), "ratio_per_round": [round(r, 3) for r in ratios],
            "cpu_ratio": round(statistics.median(cpu_ratios), 3)}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: reset by exec, unlike getrusage's ru_maxrss, which a
    child started by subprocess inherits from its parent's fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def slide_path(size: int) -> Path:
    from inference.pathology.synthetic import write_synthetic_slide

    folder = REPO / "var" / "bench-data"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"synthetic-{size}.tif"
    if not path.exists():
        t = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        write_synthetic_slide(tmp, size, workers=2)
        tmp.rename(path)
        print(f"generated {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s",
              flush=True)
    return path


# -- child tasks (each in its own process, so that its peak RSS is its own) ---------------------------------
def child_tiles(path: Path) -> dict:
    """Tiling + QC vs raw reads of the same blocks, alternated."""
    import cv2

    cv2.setNumThreads(1)
    from inference.pathology.pipeline import SlideSettings, qc_tiles
    from inference.pathology.reader import open_slide
    from inference.pathology.tiling import ResolutionReader, TileGrid, blocks_of, mask_fraction_per_tile, ordered_map
    from inference.pathology.tissue import (TissueMaskParams, overview_size, read_overview, tissue_mask,
                                            um_per_overview_px)

    settings = SlideSettings(workers=2)
    out: dict = {}
    with open_slide(path) as slide:
        meta = slide.metadata
        overview = read_overview(slide, overview_size(meta.width, meta.height, meta.mpp_x, TissueMaskParams()))
        mask, info = tissue_mask(overview.image, um_per_overview_px(overview, meta.mpp_x))
        for label, force_level0, limit in (("nearest_level", False, None), ("level0_resize", True, 60)):
            if force_level0:
                slide.best_level = lambda downsample: 0  # the research notes' setup: read level 0, resize
            reader = ResolutionReader(slide, meta.mpp_x, settings.qc.tile_mpp)
            grid = TileGrid.for_reader(reader, meta.width, meta.height, settings.qc.tile_px)
            candidates = mask_fraction_per_tile(grid, mask, overview.scale_x, overview.scale_y) >= 0.05
            blocks = blocks_of(candidates, settings.qc.block_tiles)[:limit]
            sub_mask = mask
            if limit is not None:  # restrict the QC run to the same blocks
                keep = candidates.copy()
                keep[:] = False
                for b in blocks:
                    keep[b.row:b.row + b.n_rows, b.col:b.col + b.n_cols] = candidates[
                        b.row:b.row + b.n_rows, b.col:b.col + b.n_cols]
                candidates = keep
                sub_mask = None
            tiles_in_blocks = int(sum(candidates[b.row:b.row + b.n_rows, b.col:b.col + b.n_cols].sum() for b in blocks))
            t = settings.qc.tile_px

            def region(block):
                x0, y0 = grid.origin(block.row, block.col)
                ds = reader.level_downsample
                return (reader.level, round(x0 / ds), round(y0 / ds), round(block.n_cols * t * reader.scale / ds),
                        round(block.n_rows * t * reader.scale / ds))

            def raw_direct(block):  # the same level pixels, decoded only (no resize, no QC)
                return slide.read_level(*region(block)).shape

            def raw_tiffslide(block):  # the same, through tiffslide's read_region
                return slide._backend.read_tiffslide(*region(block)).shape

            def qc():
                if sub_mask is None:
                    return _qc_on(slide, meta.mpp_x, candidates, grid, reader, info, settings)
                return qc_tiles(slide, meta.mpp_x, mask, overview.scale_x, overview.scale_y, info, settings,
                                lambda f: None)

            def qc_previous():  # the code before issue 8's work, still here as the tests' references
                with _previous_code(slide):
                    return qc()

            for _shape in ordered_map(raw_direct, blocks, workers=2):  # warm the page cache: disk is not the subject
                pass
            rounds = []
            for _ in range(ROUNDS):
                rates = {}
                for name, fn in (("direct", raw_direct), ("tiffslide", raw_tiffslide)):
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _shape in ordered_map(fn, blocks, workers=2):
                        pass
                    rates[name] = tiles_in_blocks / (time.perf_counter() - t0)
                    rates[f"{name}_cpu_s"] = time.process_time() - c0
                t0, c0 = time.perf_counter(), time.process_time()
                tiles = qc()
                t_qc = time.perf_counter() - t0
                rates["qc_cpu_s"] = time.process_time() - c0
                measured = int((tiles.status != 0).sum())
                assert measured == tiles_in_blocks, (measured, tiles_in_blocks)
                rates["qc"] = measured / t_qc
                if not force_level0:
                    t0 = time.perf_counter()
                    previous = qc_previous()
                    rates["qc_previous"] = tiles_in_blocks / (time.perf_counter() - t0)
                    assert np.array_equal(previous.status, tiles.status)
                rounds.append(rates)
            out[label] = _summary(rounds)
            if not force_level0:
                previous = statistics.median(r["qc_previous"] for r in rounds)
                out[label]["previous_code_qc_tiles_per_s"] = round(previous, 1)
                out[label]["previous_code_ratio_to_tiffslide"] = round(statistics.median(
                    r["qc_previous"] / r["tiffslide"] for r in rounds), 3)
            px = tiles_in_blocks * (t * reader.scale / reader.level_downsample) ** 2
            out[label] = {"level": reader.level, "resize": reader.resize, "blocks": len(blocks),
                          "tiles": tiles_in_blocks, **out[label],
                          "raw_decoded_mpx_per_s": round(px / 1e6 * out[label]["raw_tiles_per_s"] / tiles_in_blocks, 1)}
    real = SHARED / "wsi" / "CMU-1-Small-Region.svs"
    if real.exists():  # real H&E decodes slower than the synthetic's flat colours: the same measure on it
        out["real_svs_level0"] = _real_slide_ratio(real, settings)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


class _previous_code:
    """Within the block, QC runs the way it did before issue 8's work: tiffslide's ``read_region``, the
    whole-block Laplacian with one ``meanStdDev`` per tile, one bincount per mask pixel (the functions the
    tests now hold the faster ones to)."""

    def __init__(self, slide) -> None:
        self.backend = slide._backend

    def __enter__(self) -> None:
        from inference.pathology import pipeline, qc, tiling

        self.saved = (self.backend.read, qc.measure_block, pipeline.mask_fraction_per_tile)
        self.backend.read = self.backend.read_tiffslide
        qc.measure_block = qc.measure_block_reference
        pipeline.mask_fraction_per_tile = tiling.mask_fraction_per_tile_reference

    def __exit__(self, *exc) -> None:
        from inference.pathology import pipeline, qc

        self.backend.read, qc.measure_block, pipeline.mask_fraction_per_tile = self.saved


def _real_slide_ratio(path: Path, settings, passes: int = 15) -> dict:
    """Raw reads vs QC of every block of the small Aperio slide (0.5 µm/px at level 0: no resize), repeated."""
    from inference.pathology import qc as Q
    from inference.pathology.reader import open_slide
    from inference.pathology.tiling import ResolutionReader, TileGrid, ordered_map

    with open_slide(path) as slide:
        m = slide.metadata
        reader = ResolutionReader(slide, m.mpp_x, settings.qc.tile_mpp)
        grid = TileGrid.for_reader(reader, m.width, m.height, settings.qc.tile_px)
        t, k = settings.qc.tile_px, settings.qc.block_tiles
        blocks = [Q.Block(r, c, min(k, grid.rows - r), min(k, grid.cols - c))
                  for r in range(0, grid.rows, k) for c in range(0, grid.cols, k)] * passes
        tiles = sum(b.n_rows * b.n_cols for b in blocks)

        def raw_direct(block):
            x0, y0 = grid.origin(block.row, block.col)
            return reader.read(x0, y0, block.n_cols * t, block.n_rows * t).shape

        def raw_tiffslide(block):  # level 0 at 0.5 µm/px: no resize, the same pixels through tiffslide
            x0, y0 = grid.origin(block.row, block.col)
            return slide._backend.read_tiffslide(0, round(x0), round(y0), block.n_cols * t, block.n_rows * t).shape

        def qc(block):
            x0, y0 = grid.origin(block.row, block.col)
            pixels = reader.read(x0, y0, block.n_cols * t, block.n_rows * t)
            return Q.measure_block(pixels, block, t, np.ones((block.n_rows, block.n_cols), bool), 40, 238,
                                   settings.qc, sample=False)[2].shape

        assert reader.level == 0 and not reader.resize
        rounds = []
        for _ in range(ROUNDS):
            rates = {}
            for name, fn in (("direct", raw_direct), ("tiffslide", raw_tiffslide), ("qc", qc)):
                t0, c0 = time.perf_counter(), time.process_time()
                list(ordered_map(fn, blocks, workers=2))
                rates[name] = tiles / (time.perf_counter() - t0)
                rates[f"{name}_cpu_s"] = time.process_time() - c0
            rounds.append(rates)
    return {"level": reader.level, "resize": reader.resize, "tiles": tiles, **_summary(rounds)}


def _qc_on(slide, mpp, candidates, grid, reader, info, settings):
    """qc_tiles on given candidate tiles (the level-0 variant runs on a subset of blocks)."""
    from inference.pathology import qc as Q
    from inference.pathology.tiling import blocks_of, ordered_map

    tiles = Q.TileQc.empty(grid)
    t = settings.qc.tile_px
    grey = float(info["glass_grey_level"]) - settings.tissue.glass_margin

    blocks = blocks_of(candidates, settings.qc.block_tiles)
    every = max(1, len(blocks) // 48)

    def measure(item):
        i, block = item
        x0, y0 = grid.origin(block.row, block.col)
        pixels = reader.read(x0, y0, block.n_cols * t, block.n_rows * t)
        sub = candidates[block.row:block.row + block.n_rows, block.col:block.col + block.n_cols]
        return block, Q.measure_block(pixels, block, t, sub, int(info["saturation_threshold"]), grey, settings.qc,
                                      sample=i % every == 0)

    for block, (ratio, lap, status, sample) in ordered_map(measure, enumerate(blocks), 2):
        tiles.add(block, ratio, lap, status, sample)
    return tiles


def child_full(path: Path) -> dict:
    """The whole analysis in one process, with GeoJSON and bulk annotations from the on-disk store."""
    import cv2

    cv2.setNumThreads(1)
    from inference.pathology import dicom as D
    from inference.pathology.geojson import write_geojson
    from inference.pathology.pipeline import SlideSettings, run_analysis_stage, run_qc_stage
    from inference.pathology.reader import open_slide
    from inference.pathology.store import NucleusStore

    settings = SlideSettings(workers=2)
    with tempfile.TemporaryDirectory() as tmp, open_slide(path) as slide:
        t0 = time.perf_counter()
        qc = run_qc_stage(slide, settings)
        t_qc = time.perf_counter() - t0
        rss_qc = peak_rss_mb()
        t0 = time.perf_counter()
        analysis = run_analysis_stage(slide, qc.mpp, qc.tiles, qc.thumbnail, Path(tmp), settings)
        t_nuclei = analysis.timings["nuclei"]
        t_analysis = time.perf_counter() - t0
        rss_analysis = peak_rss_mb()
        store = NucleusStore.open(analysis.store_path)
        t0 = time.perf_counter()
        geo = write_geojson(store, Path(tmp) / "n.geojson.gz", tuple(analysis.detector["classes"]), slide_key="bench")
        t_geo = time.perf_counter() - t0
        ann = None
        header = SHARED / "wsi" / "dicom_wsi_cmu1_small_region" / "level-0-frames-0-30.dcm"
        if header.exists():  # any WSI header will do to build the object; the polygons are what costs
            import pydicom

            source = D.complete_source(pydicom.dcmread(header, stop_before_pixels=True), "bench", "bench")
            t0 = time.perf_counter()
            objects = D.nuclei_annotations(store, source, tuple(analysis.detector["classes"]), analysis.detector,
                                           slide_key="bench")
            sizes = 0
            for i, ds in enumerate(objects):
                target = Path(tmp) / f"ann{i}.dcm"
                ds.save_as(target, enforce_file_format=True)
                sizes += target.stat().st_size
            ann = {"instances": len(objects), "seconds": round(time.perf_counter() - t0, 2),
                   "megabytes": round(sizes / 1e6, 1)}
            del objects
        store.close()
        tissue_px_05 = int((qc.tiles.status == 3).sum()) * settings.qc.tile_px ** 2
    return {"slide": slide.metadata.to_json() | {"levels": len(slide.metadata.levels)},
            "tiles": qc.tile_counts, "qc_seconds": round(t_qc, 2), "qc_timings": qc.timings,
            "nuclei": analysis.nuclei.total, "nuclei_seconds": round(t_nuclei, 2),
            "nuclei_per_s": round(analysis.nuclei.total / t_nuclei, 1),
            "kept_tissue_mpx_at_0_5_per_s": round(tissue_px_05 / 1e6 / t_nuclei, 2),
            "density_per_mm2": analysis.figures.density["overall"], "analysis_seconds": round(t_analysis, 2),
            "geojson": {**geo, "seconds": round(t_geo, 2)}, "ann": ann,
            "peak_rss_mb_after_qc": rss_qc, "peak_rss_mb_after_nuclei": rss_analysis, "peak_rss_mb": peak_rss_mb()}


def child_network(path: Path) -> dict:
    """HoVer-Net (fast mode, random weights) on CPU: output megapixels per second at 0.25 µm/px."""
    import numpy as np
    import torch
    from monai.networks.nets import HoVerNet

    from inference.pathology.hovernet import HoVerNetDetector
    from inference.pathology.reader import open_slide

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bundle"
        (folder / "configs").mkdir(parents=True)
        (folder / "models").mkdir()
        (folder / "configs" / "metadata.json").write_text(json.dumps({"version": "random", "mpp": 0.25}))
        (folder / "configs" / "inference.json").write_text(json.dumps({"hovernet_mode": "fast", "patch_size": 256,
                                                                      "out_size": 164}))
        torch.manual_seed(0)
        torch.save(HoVerNet(mode="fast", in_channels=3, out_classes=6).state_dict(), folder / "models" / "model.pt")
        detector = HoVerNetDetector.from_bundle(folder, device="cpu", core_px=264, margin_px=32)
        with open_slide(path) as slide:
            m = slide.metadata
            tile = slide.read_region((m.width // 2, m.height // 2), 0, (328, 328))
        detector.detect([np.ascontiguousarray(tile[:164, :164])])  # warm-up (one patch)
        t0 = time.perf_counter()
        detector.detect([tile])
        seconds = time.perf_counter() - t0
    mpx = 328 * 328 / 1e6
    return {"model": "HoVer-Net fast (MONAI), random weights, CPU, 2 threads", "tile_px": 328,
            "network_patches": 4, "seconds": round(seconds, 2), "output_mpx_per_s": round(mpx / seconds, 4),
            "peak_rss_mb": peak_rss_mb()}


def run_child(task: str, path: Path) -> dict:
    print(f"-- {task} …", flush=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tests.bench.bench_wsi", "--child", task, str(path)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{task} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(result, indent=1), flush=True)
    return result


def extrapolate(full: dict, tiles: dict, network: dict) -> dict:
    """The seed targets from the measured rates (WSI.md §6.3: a 2 GB SVS ≈ 6 Gpx of tissue at 0.25 µm/px,
    500 MB ≈ 1.5 Gpx; HoVer-Net fast 11.1 MFLOP per output pixel; an Aperio pyramid has no 2x level, so
    its QC tiles come from level 0 + resize)."""
    out = {}
    density_px = (full["density_per_mm2"] or 0) / 1e6 * 0.0625  # nuclei per pixel at 0.25 µm/px
    geojson_per_s = full["geojson"]["features"] / max(full["geojson"]["seconds"], 1e-6)
    for name, gpx in (("2 GB slide (6 Gpx of tissue)", 6.0), ("500 MB slide (1.5 Gpx of tissue)", 1.5)):
        qc_tiles = gpx * 1e9 / (448 * 448)
        nuclei = gpx * 1e9 * density_px
        qc_min = qc_tiles / tiles["level0_resize"]["qc_tiles_per_s"] / 60
        classical_min = gpx * 1e9 / 4 / 1e6 / full["kept_tissue_mpx_at_0_5_per_s"] / 60
        geojson_min = nuclei / geojson_per_s / 60
        flop = gpx * 1e9 * 11.1e6
        out[name] = {
            "qc_minutes_2_cores_svs_pyramid": round(qc_min, 1),
            "qc_minutes_2_cores_with_2x_level": round(qc_tiles / tiles["nearest_level"]["qc_tiles_per_s"] / 60, 1),
            "classical_nuclei_minutes_2_cores": round(classical_min, 1),
            "nuclei_expected": int(nuclei),
            "geojson_minutes": round(geojson_min, 1),
            "classical_end_to_end_minutes_2_cores": round(qc_min + classical_min + geojson_min, 1),
            "hovernet_cpu_hours_2_threads": round(gpx * 1e9 / 1e6 / network["output_mpx_per_s"] / 3600, 1),
            "hovernet_gpu_minutes_rtx4070super_35tflops": round(flop / 35e12 / 60, 1),
            "hovernet_gpu_minutes_h100_400tflops": round(flop / 400e12 / 60, 1),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40_000)
    parser.add_argument("--skip-network", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "SLIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, path = args.child
        result = {"tiles": child_tiles, "full": child_full, "network": child_network}[task](Path(path))
        print(json.dumps(result))
        return 0
    load_before = os.getloadavg()
    path = slide_path(args.size)
    results = {"host": {"cpus": os.cpu_count(), "load_average_before": [round(v, 2) for v in load_before]},
               "slide": {"path": str(path.relative_to(REPO)), "size_px": args.size,
                         "megabytes": round(path.stat().st_size / 1e6, 1)}}
    results["tiles"] = run_child("tiles", path)
    results["full"] = run_child("full", path)
    if not args.skip_network:
        results["network"] = run_child("network", path)
        full, network = results["full"], results["network"]
        density_px = (full["density_per_mm2"] or 0) / 1e6 * 0.0625
        network["nuclei_per_s_at_classical_density"] = round(network["output_mpx_per_s"] * 1e6 * density_px, 2)
        results["extrapolation"] = extrapolate(full, results["tiles"], network)
    results["host"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    t, f = results["tiles"]["nearest_level"], results["full"]
    if "real_svs_level0" in results["tiles"]:
        r = results["tiles"]["real_svs_level0"]
        print(f"\nreal Aperio slide (level 0, no resize): QC {r['qc_tiles_per_s_per_core']} tiles/s/core, "
              f"ratio to raw reads ({r['reference_reader']}) {r['ratio']:.0%} (CPU {r['cpu_ratio']:.0%})")
    z = results["tiles"]["level0_resize"]
    print(f"tiling+QC {t['qc_tiles_per_s']} tiles/s ({t['qc_tiles_per_s_per_core']}/core) vs raw read "
          f"({t['reference_reader']}) {t['raw_tiles_per_s']} tiles/s: ratio {t['ratio']:.0%} "
          f"(CPU {t['cpu_ratio']:.0%}); level 0 + resize: {z['qc_tiles_per_s_per_core']} tiles/s/core "
          f"(ratio {z['ratio']:.0%}, CPU {z['cpu_ratio']:.0%})")
    print(f"classical nuclei: {f['nuclei']} in {f['nuclei_seconds']} s = {f['nuclei_per_s']}/s; "
          f"peak RSS {f['peak_rss_mb']} MB for a {args.size}² px slide")
    print(f"written to {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
