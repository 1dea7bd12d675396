"""HoVer-Net nuclei segmentation and classification from a MONAI bundle folder (the Model Zoo layout of
``pathology_nuclei_segmentation_classification``): ``configs/metadata.json``, ``configs/inference.json``
(``network_def``, ``hovernet_mode``, ``patch_size``, ``out_size``) and ``models/model.pt`` (state dict,
optionally under ``"model"``) or ``models/model.ts`` (TorchScript).

No weights are shipped or downloaded: a site puts a bundle it is licensed to use in a folder and names
that folder in ``AI.Pathology.NucleiModel`` (PanNuke-derived weights are CC BY-NC-SA 4.0). Tests build a
bundle with random weights. Class names come from ``metadata.json`` (``class_names``, or the
``type_prediction`` channel definitions), else from the number of classes: 6 → PanNuke (Neoplastic,
Inflammatory, Connective, Dead, Epithelial), 5 → CoNSeP (Other, Inflammatory, Epithelial, Spindle-shaped).
Resolution: ``metadata.json`` ``mpp``, else 0.25 µm/px (40x), the resolution these models are trained at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from inference.pathology.nuclei import UNCLASSIFIED, DetectorInfo

__all__ = ["CONSEP_CLASSES", "HoVerNetDetector", "PANNUKE_CLASSES"]

PANNUKE_CLASSES = ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")
CONSEP_CLASSES = ("Other", "Inflammatory", "Epithelial", "Spindle-shaped")


class BundleError(ValueError):
    """The folder is not a usable HoVer-Net bundle; the message says what is missing."""


class HoVerNetDetector:
    """Batched HoVer-Net inference (GPU when present, AMP on CUDA) and MONAI's HoVer-Net post-processing."""

    def __init__(self, network, info: DetectorInfo, *, patch_size: int, out_size: int, device, core_px: int = 1024,
                 margin_px: int = 128, sw_batch_size: int = 8, input_scale: float = 1 / 255,
                 postprocess: dict | None = None) -> None:
        import torch
        from monai.apps.pathology.inferers import SlidingWindowHoVerNetInferer
        from monai.apps.pathology.transforms.post.array import (HoVerNetInstanceMapPostProcessing,
                                                                HoVerNetNuclearTypePostProcessing)

        self.torch = torch
        self.network = network.to(device).eval()
        self.device = torch.device(device)
        self.info = info
        self.core_px, self.margin_px, self.min_solidity = core_px, margin_px, 0.0
        self.batch_size = 4 if self.device.type == "cuda" else 1  # tiles per call
        self.input_scale = input_scale
        self.patch_size, self.out_size = patch_size, out_size
        pad = (patch_size - out_size) // 2
        self.inferer = SlidingWindowHoVerNetInferer(
            roi_size=patch_size, sw_batch_size=sw_batch_size, overlap=1.0 - out_size / patch_size,
            padding_mode="constant", cval=0, sw_device=self.device, device=self.device,
            extra_input_padding=(pad,) * 4)
        pp = {"sobel_kernel_size": 3, "marker_threshold": 0.7, "marker_radius": 2, **(postprocess or {})}
        self.instances = HoVerNetInstanceMapPostProcessing(**pp)
        self.types = HoVerNetNuclearTypePostProcessing()

    @classmethod
    def from_bundle(cls, folder: Path, *, device: str | None = None, core_px: int = 1024, margin_px: int = 128
                    ) -> "HoVerNetDetector":
        import torch

        folder = Path(folder)
        meta_path = folder / "configs" / "metadata.json"
        if not meta_path.is_file():
            raise BundleError(f"{folder} is not a MONAI bundle: configs/metadata.json is missing")
        metadata = json.loads(meta_path.read_text())
        config = {}
        cfg_path = folder / "configs" / "inference.json"
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text())
        mode = str(config.get("hovernet_mode", metadata.get("hovernet_mode", "fast")))
        patch = int(config.get("patch_size", 256 if mode == "fast" else 270))
        out = int(config.get("out_size", 164 if mode == "fast" else 80))
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        network = _network(folder, config, mode, dev)
        out_classes = int((config.get("network_def") or {}).get("out_classes", metadata.get("out_classes", 0)) or 0)
        names = _class_names(metadata, out_classes)
        info = DetectorInfo(
            id=str(metadata.get("name") or folder.name), name=f"HoVer-Net ({mode}) from bundle {folder.name}",
            version=str(metadata.get("version", "unknown")), method="network",
            mpp=float(metadata.get("mpp", 0.25)), classes=(UNCLASSIFIED, *names),
            parameters={"bundle": folder.name, "hovernet_mode": mode, "patch_size": patch, "out_size": out,
                        "core_px": core_px, "margin_px": margin_px, "device": str(dev)},
            licence=str(metadata.get("license", metadata.get("licence", "see the bundle"))))
        return cls(network, info, patch_size=patch, out_size=out, device=dev, core_px=core_px, margin_px=margin_px)

    def detect(self, tiles: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        torch = self.torch
        batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float().mul_(self.input_scale)
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    pred = self.inferer(batch.to(self.device), self.network)
            else:
                pred = self.inferer(batch, self.network)
        out = []
        for i in range(len(tiles)):
            nuclei = pred["nucleus_prediction"][i].float()
            hover = pred["horizontal_vertical"][i].float()
            info, instance_map = self.instances(nuclei, hover)
            labels = np.asarray(instance_map.cpu() if hasattr(instance_map, "cpu") else instance_map)[0].astype(np.int32)
            n = int(labels.max())
            classes = np.zeros(n + 1, np.int32)
            probs = np.zeros(n + 1, np.float32)
            if "type_prediction" in pred and n:
                info, _ = self.types(pred["type_prediction"][i].float(), info, instance_map)
                for label, item in info.items():
                    if 0 < int(label) <= n:
                        t = int(item.get("type", 0) or 0)
                        classes[int(label)] = t if t < len(self.info.classes) else 0
                        probs[int(label)] = float(item.get("type_prob", 1.0) or 0.0)
            elif n:
                probs[1:] = 1.0
            out.append((labels, classes, probs))
        return out


def _network(folder: Path, config: dict, mode: str, device: str):
    import torch

    if (folder / "models" / "model.ts").is_file():
        return torch.jit.load(str(folder / "models" / "model.ts"), map_location=device)
    weights = folder / "models" / "model.pt"
    if not weights.is_file():
        raise BundleError(f"{folder}: models/model.pt (or model.ts) is missing")
    if "network_def" in config:
        from monai.bundle import ConfigParser

        parser = ConfigParser({"network_def": config["network_def"], "hovernet_mode": mode,
                               "bundle_root": str(folder)})
        network = parser.get_parsed_content("network_def")
    else:
        from monai.networks.nets import HoVerNet

        network = HoVerNet(mode=mode, in_channels=3, out_classes=6)
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    network.load_state_dict(state)
    return network


def _class_names(metadata: dict, out_classes: int) -> tuple[str, ...]:
    names = metadata.get("class_names")
    if isinstance(names, list) and names:
        return tuple(str(n) for n in names)
    channels = (((metadata.get("network_data_format") or {}).get("outputs") or {}).get("type_prediction") or {}
                ).get("channel_def") or {}
    if len(channels) > 2:
        return tuple(str(channels[k]) for k in sorted(channels, key=int) if str(k) != "0")
    if out_classes == 6:
        return PANNUKE_CLASSES
    if out_classes == 5:
        return CONSEP_CLASSES
    return tuple(f"Type {i}" for i in range(1, max(out_classes, 1)))
