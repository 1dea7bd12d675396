"""Train the ``brain-lesion-unet`` demonstration bundle: a small 2D MONAI UNet, on lesion phantoms in real MR.

    nice -n 10 python -m inference.models.training.train_brain_lesion [--iterations N] [--out DIR]

Training data: the two real brain MR series of ``shared/data/mr_brain`` (one volunteer, Siemens 3T, T1
2D FLASH sagittal, head-first supine and decubitus; BSD-2-Clause, dcm_qa_decubitus), into which
synthetic lesions are inserted on the fly, in millimetres, on the native grid:
- shape: ellipsoids of 2.5-22 mm radius, randomly oriented, lobulated by a smooth random field;
- appearance: solid, textured or ring-enhancing, contrast 1.08-2.2x the brain median (subtle to
  obvious), soft partial-volume edges, an optional darker (oedema-like) halo that is *not* labelled;
- hard negatives that are not labelled: thin bright tubes (vessel-like, as on contrast-enhanced T1);
- whole-image changes: smooth multiplicative bias field, Gaussian noise, and in 2D gamma, contrast,
  blur, flips, 90-degree rotations and zoom;
- planes: slices along the acquisition axis (sagittal) and, for 35 % of the cases, along a reformatted
  axis (axial or coronal at 4.8 mm through-plane resolution), so the network does not learn one plane.

Nothing from ``shared/data/brain_lesion`` (pyradiomics brain1, the evaluation case) is read here.

The preprocessing is the bundle's own (``configs/inference.json``: Spacingd to 1.2 mm in plane, intensity
percentiles 1-99.5 to [0, 1]), applied to image and label with the same ConfigParser, so training and
inference cannot drift apart. Seeds are fixed: the same iterations on the same thread count give the
same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from inference.models.bundle import image_from_volumes
from inference.models.manifest import BUILTIN_MODELS_DIR
from inference.volume import Volume, volume_from_files

BUNDLE = BUILTIN_MODELS_DIR / "brain-lesion-unet"
REPO = Path(__file__).resolve().parents[3]
SHARED = Path(os.environ.get("AI_SHARED_DATA", REPO.parent / "shared" / "data"))
TRAINING_SERIES = ("mr_brain/siemens_t1_fl2d_sag_HFS", "mr_brain/siemens_t1_fl2d_sag_HFDR")
PATCH = 128
SEED = 20261121


# --- real anatomy ---------------------------------------------------------------------------------


@dataclass
class Anatomy:
    """One real series and what phantoms need from it: a head-interior mask and the brain's median."""

    volume: Volume
    mask: np.ndarray  # bool (k, j, i): brain-like tissue of the cerebrum, where phantoms may extend
    centers: np.ndarray  # (n, 3) voxel indices well inside the mask, to draw phantom centres from
    reference: float  # median intensity inside the mask


def _ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    half = [int(radius_mm // s) for s in spacing]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    return sum((g * s) ** 2 for g, s in zip(grids, spacing)) <= radius_mm ** 2


def phantom_region(volume: Volume, depth_mm: float = 100.0) -> tuple[np.ndarray, float]:
    """Where lesions may lie in a head MR series: brain-like intensities inside the head, in the top
    ``depth_mm`` below the vertex (cerebrum, not neck or face); also the median intensity there."""
    spacing = volume.spacing
    smoothed = ndi.gaussian_filter(volume.array, [1.0 / s for s in spacing])
    head = smoothed > threshold_otsu(smoothed[::2, ::4, ::4])
    labels, count = ndi.label(head)
    if count:
        head = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    for k in range(head.shape[0]):
        head[k] = ndi.binary_fill_holes(head[k])
    head = ndi.binary_erosion(head, _ball(5.0, spacing))
    k, j, i = np.nonzero(head)
    superior = (volume.affine @ np.stack([i, j, k, np.ones_like(i)]).astype(np.float64))[2]
    top = np.zeros(head.shape, bool)
    top[k[superior > superior.max() - depth_mm], j[superior > superior.max() - depth_mm],
        i[superior > superior.max() - depth_mm]] = True
    reference = float(np.median(smoothed[top]))
    region = top & (smoothed > 0.4 * reference) & (smoothed < 1.6 * reference)
    region = ndi.binary_opening(region, _ball(2.0, spacing))
    return region, float(np.median(volume.array[region]))


def load_anatomy(shared: Path = SHARED) -> list[Anatomy]:
    """The training series (never the evaluation case), each with its phantom region and reference intensity."""
    anatomies = []
    for name in TRAINING_SERIES:
        folder = shared / name
        if "brain_lesion" in folder.parts:
            raise ValueError("the evaluation case must not be used for training")
        volume = volume_from_files(sorted(folder.glob("*.dcm")))
        region, reference = phantom_region(volume)
        centers = np.argwhere(ndi.binary_erosion(region, _ball(3.0, volume.spacing)))
        anatomies.append(Anatomy(volume, region, centers, reference))
    return anatomies


# --- phantoms -------------------------------------------------------------------------------------


def _smooth_noise(shape: tuple[int, ...], sigma_voxels: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field (float32)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_voxels, mode="reflect")
    std = float(field.std())
    return (field - float(field.mean())) / (std if std > 0 else 1.0)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _box(center: np.ndarray, half: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    low = np.maximum(np.floor(center - half).astype(int), 0)
    high = np.minimum(np.ceil(center + half).astype(int) + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _offsets_mm(box: tuple[slice, ...], center: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """(3, *box shape) millimetre offsets from ``center`` along the array axes (k, j, i)."""
    grids = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in box], indexing="ij")
    return np.stack([(g - c) * s for g, c, s in zip(grids, center, spacing)])


def insert_lesion(image: np.ndarray, label: np.ndarray, anatomy: Anatomy, rng: np.random.Generator) -> None:
    """Paint one lesion phantom into ``image`` (in place) and mark it in ``label``."""
    spacing = np.asarray(anatomy.volume.spacing, dtype=np.float32)  # (k, j, i) mm
    center = anatomy.centers[rng.integers(len(anatomy.centers))].astype(np.float32)
    radii = np.exp(rng.uniform(np.log(2.5), np.log(22.0))) * rng.uniform(0.6, 1.0, 3)
    lobulation = rng.uniform(0.0, 0.35)
    edge_mm = rng.uniform(0.4, 2.0)
    half = (radii.max() * (1 + lobulation) + 2 * edge_mm + 2) / spacing + 1
    box = _box(center, half, image.shape)
    offsets = _offsets_mm(box, center, spacing)
    rotated = np.einsum("ab,b...->a...", _random_rotation(rng).astype(np.float32), offsets)
    distance = np.sqrt(sum((rotated[a] / radii[a]) ** 2 for a in range(3)))  # 1 on the ellipsoid surface
    sigma = np.maximum(radii.mean() * 0.4 / spacing, 0.5)
    distance = distance * (1 + lobulation * _smooth_noise(distance.shape, sigma, rng))
    weight = np.clip((1 - distance) * radii.mean() / edge_mm + 0.5, 0, 1)  # soft partial-volume edge
    inside = anatomy.mask[box]
    weight *= inside
    if not (weight > 0.5).any():
        return

    region = image[box]
    background = ndi.gaussian_filter(region, 1.0)
    ref = anatomy.reference
    kind = rng.choice(["solid", "textured", "ring", "subtle"], p=[0.3, 0.3, 0.2, 0.2])
    if kind == "subtle":
        target = np.full(region.shape, ref * rng.uniform(1.08, 1.25), np.float32)
    else:
        target = np.full(region.shape, ref * rng.uniform(1.25, 2.2), np.float32)
    if kind in ("textured", "ring"):
        texture = _smooth_noise(region.shape, np.maximum(rng.uniform(0.8, 3.0) / spacing, 0.5), rng)
        target *= 1 + rng.uniform(0.1, 0.3) * texture
    if kind == "ring":
        thickness = rng.uniform(0.25, 0.5)
        core = np.clip((1 - thickness - distance) * radii.mean() / edge_mm + 0.5, 0, 1)
        target = target * (1 - core) + core * ref * rng.uniform(0.5, 1.0)
    if rng.random() < 0.35:  # oedema-like darker halo, not part of the lesion label
        reach = rng.uniform(0.3, 1.0)
        halo = np.clip(1 - np.abs(distance - 1 - reach / 2) / (reach / 2), 0, 1) * (weight < 0.5) * inside
        region *= 1 - halo * rng.uniform(0.05, 0.2)
    region += weight * (target - background)
    label[box] |= weight > 0.5


def insert_vessel(image: np.ndarray, anatomy: Anatomy, rng: np.random.Generator) -> None:
    """Paint a thin bright tube (vessel-like hard negative, not labelled) into ``image``."""
    spacing = np.asarray(anatomy.volume.spacing, dtype=np.float32)
    point = anatomy.centers[rng.integers(len(anatomy.centers))].astype(np.float32) * spacing  # mm
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    radius = rng.uniform(0.5, 1.5)
    tube = np.zeros(image.shape, np.float32)
    for _ in range(int(rng.uniform(15, 70))):  # 1 mm steps along a smoothly bending path
        direction += rng.standard_normal(3) * 0.15
        direction /= np.linalg.norm(direction)
        point = point + direction
        center = point / spacing
        if not all(0 <= c < n for c, n in zip(center, image.shape)):
            break
        box = _box(center, (radius + 1.5) / spacing + 1, image.shape)
        distance = np.sqrt((_offsets_mm(box, center, spacing) ** 2).sum(axis=0))
        np.maximum(tube[box], np.clip(radius + 0.5 - distance, 0, 1), out=tube[box])
    image += tube * anatomy.reference * rng.uniform(0.3, 1.2)


def bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(quadratic polynomial) with about ``strength`` relative amplitude."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    k, j, i = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [k, j, i, k * k, j * j, i * i, k * j, k * i, j * i]
    log_field = sum(rng.normal(0, strength / 2) * t for t in terms)
    return np.exp(log_field).astype(np.float32)


def synthetic_case(anatomy: Anatomy, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """A copy of a real series with 0-4 lesion phantoms, vessel-like negatives, bias field and noise."""
    image = anatomy.volume.array.astype(np.float32, copy=True)
    label = np.zeros(image.shape, bool)
    for _ in range(rng.choice([0, 1, 2, 3, 4], p=[0.1, 0.3, 0.3, 0.2, 0.1])):
        insert_lesion(image, label, anatomy, rng)
    for _ in range(rng.integers(0, 7)):
        insert_vessel(image, anatomy, rng)
    image *= bias_field(image.shape, rng, rng.uniform(0.0, 0.4))
    image += rng.normal(0, anatomy.reference * rng.uniform(0.0, 0.05), image.shape).astype(np.float32)
    np.maximum(image, 0, out=image)
    case = Volume(array=image, affine=anatomy.volume.affine.copy(), frames=[], datasets=[], study_instance_uid="",
                  series_instance_uid="synthetic", frame_of_reference_uid=None, modality="MR",
                  series_description="synthetic lesion phantoms")
    return case, label


def reformatted(volume: Volume, label: np.ndarray, axis: int) -> tuple[Volume, np.ndarray]:
    """The same voxels seen with another array axis as the slice axis (affine permuted to match)."""
    order = {0: (0, 1, 2), 1: (1, 0, 2), 2: (2, 1, 0)}[axis]  # new (k, j, i) from old array axes
    array = np.ascontiguousarray(np.transpose(volume.array, order))
    columns = [2 - a for a in order[::-1]]  # affine column (i, j, k) of each new index
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, columns]
    if np.linalg.det(affine[:3, :3]) < 0:  # keep a right-handed grid: flip the new i axis
        array = np.ascontiguousarray(array[:, :, ::-1])
        label = np.ascontiguousarray(np.transpose(label, order)[:, :, ::-1])
        affine[:3, 3] += affine[:3, 0] * (array.shape[2] - 1)
        affine[:3, 0] *= -1
    else:
        label = np.ascontiguousarray(np.transpose(label, order))
    return Volume(array, affine, [], [], "", "synthetic", None, "MR", "reformat"), label


# --- the bundle's preprocessing, for image and label ----------------------------------------------


def training_transforms(bundle: Path = BUNDLE):
    """The bundle's inference preprocessing (minus loading) applied to "image" and "label" alike."""
    from monai.bundle import ConfigParser

    config = json.loads((bundle / "configs" / "inference.json").read_text())
    transforms = []
    for item in config["preprocessing"]["transforms"]:
        name = item["_target_"].rsplit(".", 1)[-1]
        if name in ("LoadImaged", "EnsureChannelFirstd"):
            continue
        item = copy.deepcopy(item)
        if name == "Spacingd":
            item["keys"], item["mode"] = ["image", "label"], ["bilinear", "nearest"]
        transforms.append(item)
    parser = ConfigParser({"imports": config.get("imports", []),
                           "transforms": {"_target_": "Compose", "transforms": transforms}})
    return parser.get_parsed_content("transforms")


def network(bundle: Path = BUNDLE) -> torch.nn.Module:
    """The bundle's ``network_def``, instantiated."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def")


# --- 2D samples -----------------------------------------------------------------------------------


def _crop(image: torch.Tensor, label: torch.Tensor, center: tuple[int, int] | None, size: int,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size`` x ``size`` crop (zero padded) of a (1, H, W) slice, around ``center`` (jittered) or random."""
    shape = image.shape[-2:]
    pad = [max(0, size - s) for s in shape]
    if any(pad):
        padding = (pad[1] // 2, pad[1] - pad[1] // 2, pad[0] // 2, pad[0] - pad[0] // 2)
        image = torch.nn.functional.pad(image, padding)
        label = torch.nn.functional.pad(label, padding)
        if center is not None:
            center = (center[0] + pad[0] // 2, center[1] + pad[1] // 2)
        shape = image.shape[-2:]
    starts = []
    for axis in range(2):
        high = shape[axis] - size
        if center is None:
            starts.append(int(rng.integers(0, high + 1)))
        else:
            wanted = center[axis] - size // 2 + int(rng.integers(-size // 3, size // 3 + 1))
            starts.append(int(np.clip(wanted, 0, high)))
    window = (..., slice(starts[0], starts[0] + size), slice(starts[1], starts[1] + size))
    return image[window], label[window]


def augment(image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """2D intensity and geometry changes of one (1, H, W) sample in [0, 1]; the result is PATCH x PATCH."""
    if image.shape[-1] != PATCH or image.shape[-2] != PATCH:  # zoom: the crop was larger or smaller
        image = torch.nn.functional.interpolate(image[None], size=(PATCH, PATCH), mode="bilinear",
                                                align_corners=False)[0]
        label = torch.nn.functional.interpolate(label[None], size=(PATCH, PATCH), mode="nearest")[0]
    if rng.random() < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    turns = int(rng.integers(0, 4))
    image, label = torch.rot90(image, turns, (-2, -1)), torch.rot90(label, turns, (-2, -1))
    image = image.clamp(0, 1) ** float(np.exp(rng.uniform(np.log(0.7), np.log(1.5))))
    image = image * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(-0.08, 0.08))
    if rng.random() < 0.3:
        sigma = float(rng.uniform(0.3, 1.0))
        image = torch.from_numpy(ndi.gaussian_filter(image.numpy(), (0, sigma, sigma)))
    if rng.random() < 0.5:
        image = image + float(rng.uniform(0, 0.04)) * torch.from_numpy(
            rng.standard_normal(image.shape).astype(np.float32))
    return image.contiguous(), label.contiguous()


def preprocessed_case(anatomies: Sequence[Anatomy], transforms, rng: np.random.Generator):
    """One synthetic case through the bundle's preprocessing: (image, label) tensors (1, X, Y, Z)."""
    anatomy = anatomies[int(rng.integers(len(anatomies)))]
    volume, label = synthetic_case(anatomy, rng)
    if rng.random() < 0.35:
        volume, label = reformatted(volume, label, int(rng.choice([1, 2])))
    label_volume = Volume(label.astype(np.float32), volume.affine, [], [], "", "", None, "MR", "")
    data = transforms({"image": image_from_volumes([volume]), "label": image_from_volumes([label_volume])})
    return data["image"].as_tensor(), (data["label"].as_tensor() > 0.5).float()


def samples(anatomies: Sequence[Anatomy], transforms, rng: np.random.Generator,
            per_case: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless 2D (image, label) patches; half centred on a lesion, half anywhere in the head."""
    while True:
        image, label = preprocessed_case(anatomies, transforms, rng)
        lesion_slices = np.flatnonzero(label[0].sum(dim=(0, 1)).numpy() > 0)
        for _ in range(per_case):
            center = None
            if len(lesion_slices) and rng.random() < 0.5:
                z = int(rng.choice(lesion_slices))
                points = torch.nonzero(label[0, :, :, z])
            else:  # anywhere in the head (face, neck and skull base included): negatives, mostly
                z = int(rng.integers(image.shape[-1]))
                points = torch.nonzero(image[0, :, :, z] > 0.1)
            if len(points):
                point = points[int(rng.integers(len(points)))]
                center = (int(point[0]), int(point[1]))
            size = int(round(PATCH / np.exp(rng.uniform(np.log(0.8), np.log(1.25)))))  # zoom 0.8-1.25
            yield augment(*_crop(image[..., z], label[..., z], center, size, rng), rng)


def _patch_batch(source: Iterator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [next(source) for _ in range(count)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


# --- validation on fresh phantoms through the real bundle loader ------------------------------------


def validate(bundle: Path, anatomies: Sequence[Anatomy], cases: int, seed: int) -> dict[str, float]:
    """Dice and volume error on new phantoms (same anatomy, other seed), run through MonaiBundleModel."""
    from inference.models.manifest import load_manifests
    from inference.models.registry import load_model

    manifest = next(m for m in load_manifests([bundle.parent], trusted=[bundle.parent]) if m.path == str(bundle))
    model = load_model(manifest)
    rng = np.random.default_rng(seed)
    overlap = predicted = reference = 0
    dices = []
    for _ in range(cases):
        volume, label = synthetic_case(anatomies[int(rng.integers(len(anatomies)))], rng)
        result = model.segment(volume, lambda fraction: None).labels > 0
        o, p, r = int((result & label).sum()), int(result.sum()), int(label.sum())
        overlap, predicted, reference = overlap + o, predicted + p, reference + r
        if r:
            dices.append(2 * o / (p + r))
    return {"cases": cases, "pooled_dice": 2 * overlap / max(predicted + reference, 1),
            "mean_case_dice": float(np.mean(dices)) if dices else float("nan"),
            "volume_error": abs(predicted - reference) / max(reference, 1)}


# --- training -------------------------------------------------------------------------------------


def train(iterations: int, batch: int, out: Path, *, threads: int = 2, log_every: int = 50,
          max_minutes: float | None = None) -> dict:
    """Train from scratch with fixed seeds; writes ``out`` (a state dict) and returns figures."""
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    torch.set_num_threads(threads)
    set_determinism(seed=SEED)
    rng = np.random.default_rng(SEED)
    anatomies = load_anatomy()
    transforms = training_transforms()
    net = network()
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=iterations, pct_start=0.05)
    # Dice on the lesion channel only (with the background in it, predicting no lesion at all already halves
    # the loss and training stalls there); cross-entropy keeps the background calibrated.
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    source = samples(anatomies, transforms, rng)
    start = time.perf_counter()
    running = 0.0
    done = 0
    for iteration in range(1, iterations + 1):
        images, labels = _patch_batch(source, batch)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(net(images), labels)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += loss.item()
        done = iteration
        if iteration % log_every == 0:
            minutes = (time.perf_counter() - start) / 60
            print(f"iteration {iteration}/{iterations}  loss {running / log_every:.4f}  {minutes:.1f} min", flush=True)
            running = 0.0
            if max_minutes is not None and minutes > max_minutes:
                print(f"stopping early: time budget of {max_minutes} min reached", flush=True)
                break
    seconds = time.perf_counter() - start
    net.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    return {"iterations": done, "batch": batch, "threads": threads, "train_seconds": round(seconds, 1),
            "parameters": sum(p.numel() for p in net.parameters()), "weights_bytes": out.stat().st_size}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early (breaks determinism)")
    parser.add_argument("--validation-cases", type=int, default=8)
    parser.add_argument("--out", type=Path, default=BUNDLE / "models" / "model.pt")
    args = parser.parse_args(argv)
    figures = train(args.iterations, args.batch, args.out, threads=args.threads, max_minutes=args.max_minutes)
    if args.out.resolve() == (BUNDLE / "models" / "model.pt").resolve() and args.validation_cases:
        figures["synthetic_validation"] = validate(BUNDLE, load_anatomy(), args.validation_cases, SEED + 1)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
