"""Worker overhead of a network model (``make bench``): not a timed test.

For one real MR series (the 35-slice brain) and our MONAI-bundle 2D UNet, in the same run:
- end to end in the real worker (fetch over REST, volume, bundle preprocessing, inference, postprocessing,
  SEG/RTSTRUCT/SR/PDF encode, store): the job's running → done time, median of 3 forced runs after a
  warm-up run (which loads the model);
- the bare inferer forward of the same network on the same preprocessed tensor, median of 3 after a warm-up;
→ the overhead ratio (end to end / bare forward − 1), and the worker's peak RSS (VmHWM). The fixed cost around
the forward is then set against the bare forward, on the same series, of a network of the Model Zoo's size
(the architecture and sliding window of ``spleen_ct_segmentation``, random weights: timing only).
Run: ``python -m tests.bench.bench_model_overhead``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pydicom
import torch

from inference.models.manifest import BUILTIN_MODELS_DIR, load_manifests
from inference.models.registry import load_model
from inference.volume import volume_from_files
from inference.models.bundle import image_from_volumes
from tests.bench.bench_ingest import SHARED
from tests.integration.harness import OrthancServer

MODEL = "brain-lesion-unet"
ZOO_MODEL = "spleen_ct_segmentation"


def zoo_sized_bundle(root: Path) -> Path:
    """The spleen bundle's structure and sizes (Model Zoo ``spleen_ct_segmentation`` 0.5.x), random weights."""
    from monai.networks.nets import UNet

    from tests.unit.test_bundle import spleen_config, write_bundle, zoo_metadata

    network_def = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                   "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"}
    config = spleen_config(network_def)
    config["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4,
                         "overlap": 0.5}
    torch.manual_seed(0)
    network = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
    return write_bundle(root, ZOO_MODEL, config, zoo_metadata("MR", {"0": "image"}, {"0": "background",
                                                                                    "1": "spleen"}), network)


def peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def bare_forward_seconds(series: Path, model: str = MODEL, models_dir: Path = BUILTIN_MODELS_DIR,
                         repeats: int = 3) -> tuple[float, tuple[int, ...]]:
    torch.set_num_threads(2)
    manifest = next(m for m in load_manifests([models_dir], trusted=(models_dir,)) if m.id == model)
    pipeline = load_model(manifest).pipeline
    volume = volume_from_files(sorted(series.glob("*.dcm")))
    with torch.inference_mode():
        data = pipeline.preprocessing({pipeline.input_key: image_from_volumes([volume])})
        batch = data[pipeline.input_key].unsqueeze(0).to(pipeline.device)
        pipeline.inferer(batch, pipeline.network)  # warm-up, as the worker's first job is
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pipeline.inferer(batch, pipeline.network)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), tuple(batch.shape)


def end_to_end(series: Path, model: str = MODEL, overrides: dict | None = None, repeats: int = 3) -> dict:
    study = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    with tempfile.TemporaryDirectory() as tmp:
        server = OrthancServer(Path(tmp), overrides={"AI": {"AutoTrigger": False, **(overrides or {})}}).start()
        try:
            server.storescu(series)
            time.sleep(3)
            runs, timings = [], []
            for i in range(repeats + 1):  # the first run loads the model: a warm-up, left out
                time.sleep(3)  # let Orthanc finish with the previous results (follow-up, outbox): a job alone
                r = server.post(f"/ai/studies/{study}/segment", {"model": model, "force": i > 0})
                r.raise_for_status()
                job_id = r.json()["id"]
                jobs = server.wait_jobs(study, i + 1, timeout=600)
                job = next(j for j in jobs if j["id"] == job_id)
                assert job["state"] == "done", job
                full = server.get(f"/ai/jobs/{job_id}")
                start = datetime.fromisoformat(full["started_at"]).timestamp()
                end = datetime.fromisoformat(full["finished_at"]).timestamp()
                if i:
                    runs.append(end - start)
                    timings.append(full["timings"])
            pid = server.health()["worker"]["processes"][0]["pid"]
            rss = peak_rss_mb(pid)
        finally:
            server.stop()
    median_timings = {k: round(statistics.median(t[k] for t in timings), 2) for k in timings[0]}
    return {"running_to_done_s": round(statistics.median(runs), 2), "runs": [round(r, 2) for r in runs],
            "stage_medians_s": median_timings, "worker_peak_rss_mb": round(rss) if rss else None}


def main() -> int:
    series = SHARED / "mr_brain" / "siemens_t1_fl2d_sag_HFS"
    if not series.is_dir():
        print(f"shared data not found at {series}", file=sys.stderr)
        return 2
    e2e = end_to_end(series)
    bare, shape = bare_forward_seconds(series)
    result = {"model": MODEL, "series": series.name, "tensor": list(shape), "bare_forward_s": round(bare, 2),
              **e2e, "overhead_ratio": round(e2e["running_to_done_s"] / bare - 1, 2)}
    fixed = e2e["running_to_done_s"] - bare  # fetch, volume, bundle pre/postprocessing, writers, store
    result["fixed_cost_s"] = round(fixed, 2)
    # The same fixed cost around a network of the Model Zoo's size: its forward on the same series, same run.
    # (Its random weights would segment noise, so it is not run end to end: the writers' cost depends on the
    # output, and a random one would measure the noise, not the engine.)
    with tempfile.TemporaryDirectory() as tmp:
        folder = zoo_sized_bundle(Path(tmp))
        zoo_bare, zoo_shape = bare_forward_seconds(series, ZOO_MODEL, folder.parent)
    result["zoo_sized_network"] = {
        "model": f"{ZOO_MODEL} architecture and sliding window (3D UNet 16-256 channels, 96^3, overlap 0.5)",
        "tensor": list(zoo_shape), "bare_forward_s": round(zoo_bare, 2),
        "projected_overhead_ratio": round(fixed / zoo_bare, 2)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
