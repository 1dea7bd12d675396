"""Accuracy of a built-in brain-lesion model on pyradiomics brain1 (the README's figures).

    python -m tests.bench.eval_brain_lesion [--model brain-lesion-candidates|brain-lesion-unet] [--json]

Prints voxel Dice, precision and recall, lesion-wise detection (a reference lesion component counts as
detected when any predicted voxel touches it; a predicted component is a false positive when it touches
none) and the run time. brain1 is also the case the default parameters were chosen on, so these figures
are optimistic: they show that the method works as described, not how well it generalizes.
``brain-lesion-unet`` never saw brain1 (trained on phantoms in other series): its figures are a held-out test
on one case. The absolute volume error is |predicted - reference| in mL and relative to the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from inference.models.manifest import BUILTIN_MODELS_DIR, load_manifests
from inference.models.registry import load_model
from inference.volume import Volume

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("AI_SHARED_DATA", REPO.parent / "shared" / "data"))
BRAIN1_IMAGE = SHARED / "brain_lesion" / "pyradiomics_brain1_image.nrrd"
BRAIN1_LABEL = SHARED / "brain_lesion" / "pyradiomics_brain1_label.nrrd"
MODEL_ID = "brain-lesion-candidates"


def volume_from_nrrd(path: Path, modality: str = "MR") -> Volume:
    """A Volume from a 3D NRRD in LPS space (pynrrd axes x, y, z become array axes slice, row, column)."""
    import nrrd  # test/bench dependency only

    data, header = nrrd.read(str(path))
    if header.get("space", "left-posterior-superior") not in ("left-posterior-superior", "LPS"):
        raise ValueError(f"{path}: only LPS NRRD files are supported, not {header['space']!r}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=float).T  # columns: i, j, k
    affine[:3, 3] = np.asarray(header.get("space origin", (0.0, 0.0, 0.0)), dtype=float)
    array = np.ascontiguousarray(np.transpose(data, (2, 1, 0))).astype(np.float32)
    return Volume(array=array, affine=affine, frames=[], datasets=[], study_instance_uid="",
                  series_instance_uid="", frame_of_reference_uid=None, modality=modality,
                  series_description=path.stem)


def reference_mask(path: Path) -> np.ndarray:
    """Boolean mask on the same (slice, row, column) grid as ``volume_from_nrrd``."""
    import nrrd

    data, _ = nrrd.read(str(path))
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0))) > 0


def scores(predicted: np.ndarray, reference: np.ndarray) -> dict[str, float | int]:
    """Voxel Dice/precision/recall and lesion-wise counts (26-connected components)."""
    overlap = int(np.count_nonzero(predicted & reference))
    n_pred, n_ref = int(np.count_nonzero(predicted)), int(np.count_nonzero(reference))
    structure = np.ones((3, 3, 3), bool)
    ref_components, ref_count = ndi.label(reference, structure)
    pred_components, pred_count = ndi.label(predicted, structure)
    detected = len(set(np.unique(ref_components[predicted])) - {0})
    true_components = len(set(np.unique(pred_components[reference])) - {0})
    return {
        "dice": 2 * overlap / (n_pred + n_ref) if n_pred + n_ref else 1.0,
        "precision": overlap / n_pred if n_pred else 0.0,
        "recall": overlap / n_ref if n_ref else 0.0,
        "reference_lesions": ref_count,
        "detected_lesions": detected,
        "predicted_components": pred_count,
        "false_positive_components": pred_count - true_components,
        "predicted_voxels": n_pred,
        "reference_voxels": n_ref,
        "volume_error_fraction": abs(n_pred - n_ref) / n_ref if n_ref else float(n_pred > 0),
    }


def evaluate(model_id: str = MODEL_ID) -> dict[str, float | int]:
    """Run a built-in model on brain1 and score it."""
    manifest = next(m for m in load_manifests([BUILTIN_MODELS_DIR]) if m.id == model_id)
    model = load_model(manifest)
    volume = volume_from_nrrd(BRAIN1_IMAGE)
    reference = reference_mask(BRAIN1_LABEL)
    start = time.perf_counter()
    result = model.segment(volume, lambda fraction: None)
    seconds = time.perf_counter() - start
    figures = scores(result.labels > 0, reference)
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    figures["predicted_ml"] = round(figures["predicted_voxels"] * voxel_ml, 2)
    figures["reference_ml"] = round(figures["reference_voxels"] * voxel_ml, 2)
    figures["volume_error_ml"] = round(abs(figures["predicted_ml"] - figures["reference_ml"]), 2)
    figures["seconds"] = round(seconds, 2)
    figures["shape"] = list(volume.array.shape)
    figures["model"] = model_id
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL_ID, help="built-in model id (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not BRAIN1_IMAGE.is_file():
        raise SystemExit(f"brain1 not found at {BRAIN1_IMAGE} (set AI_SHARED_DATA)")
    figures = evaluate(args.model)
    if args.json:
        print(json.dumps(figures))
        return
    caveat = "tuning case: optimistic" if args.model == MODEL_ID else "never used in training or tuning"
    print(f"{args.model} on pyradiomics brain1 {figures['shape']} ({caveat})")
    print(f"  Dice {figures['dice']:.3f}  precision {figures['precision']:.3f}  recall {figures['recall']:.3f}")
    print(f"  lesions detected {figures['detected_lesions']}/{figures['reference_lesions']}  "
          f"false-positive components {figures['false_positive_components']}  "
          f"(predicted {figures['predicted_components']} components, {figures['predicted_voxels']} voxels; "
          f"reference {figures['reference_voxels']} voxels)")
    print(f"  volume {figures['predicted_ml']:.2f} mL vs reference {figures['reference_ml']:.2f} mL: absolute error "
          f"{figures['volume_error_ml']:.2f} mL ({100 * figures['volume_error_fraction']:.0f} %)")
    print(f"  run time {figures['seconds']:.2f} s")


if __name__ == "__main__":
    main()
