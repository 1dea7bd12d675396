"""A TorchScript network with a small manifest: the preprocessing it needs is declared, not coded.

The manifest's ``params`` describe what a MONAI bundle's configs would: orientation, spacing, intensity
normalisation, patch size and sliding window, activation and label values. They are turned into MONAI
transforms (``Orientationd``, ``Spacingd``, a normalisation, ``Activationsd``/``Invertd``/``AsDiscreted``)
and run by the same ``MonaiPipeline`` as bundles, so both kinds of model share one tested path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from inference.models.base import ModelInfo, ProgressCallback, SegmentationResult
from inference.models.bundle import ModelLoadError, MonaiPipeline, select_device
from inference.models.manifest import files_checksum
from inference.volume import Volume

_NORMALISATIONS = ("zscore", "percentile", "window", "range", "none")


@dataclass(frozen=True)
class TorchScriptParams:
    """What the manifest's ``params`` may say (all optional except the model file, which defaults to model.ts).

    - ``model``: the TorchScript file in the model folder;
    - ``channels``: names of the input series in channel order (["FLAIR"], or ["T1c", "T1", "T2", "FLAIR"]);
    - ``orientation``: axis codes the network expects ("RAS", "LPS", ...), or "" to keep the series' own axes;
    - ``spacing``: voxel size in mm along those axes; a value <= 0 keeps the series' spacing; [] no resampling;
    - ``normalization``: {"method": "zscore", "nonzero": bool} | {"method": "percentile", "lower", "upper"} |
      {"method": "window", "center", "width"} (CT) | {"method": "range", "a_min", "a_max"} | {"method": "none"};
      percentile/window/range map to [b_min, b_max] (default [0, 1]) and clip;
    - ``patch_size``: sliding-window size (3 values; 2 values run a 2D network slice by slice along the last axis);
    - ``sw_batch_size``, ``overlap``, ``blend`` ("gaussian" or "constant"): sliding-window settings;
    - ``activation``: "softmax" (argmax; channel c is label c) or "sigmoid" (threshold; channel c is label c + 1);
    - ``threshold``: for sigmoid outputs; ``label_values``: label of each output channel, overriding the defaults;
    - ``device``: "auto", "cpu" or "cuda[:n]".
    """

    model: str = "model.ts"
    channels: tuple[str, ...] = ("image",)
    orientation: str = "RAS"
    spacing: tuple[float, ...] = ()
    normalization: dict | None = None
    patch_size: tuple[int, ...] = (96, 96, 96)
    sw_batch_size: int = 1
    overlap: float = 0.25
    blend: str = "gaussian"
    activation: str = "softmax"
    threshold: float = 0.5
    label_values: tuple[int, ...] = ()
    device: str = "auto"

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> TorchScriptParams:
        """Validate the manifest's params; unknown keys (pipeline options, checksum) are ignored."""
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        for key in ("channels", "spacing", "patch_size", "label_values"):
            if key in known:
                known[key] = tuple(known[key]) if isinstance(known[key], (list, tuple)) else (known[key],)
        if isinstance(params.get("channels"), int):
            known["channels"] = tuple(f"channel {c}" for c in range(params["channels"]))
        p = cls(**known)
        method = (p.normalization or {"method": "none"}).get("method")
        if method not in _NORMALISATIONS:
            raise ModelLoadError(f"params.normalization.method must be one of {', '.join(_NORMALISATIONS)}, "
                                 f"not {method!r}")
        if len(p.patch_size) not in (2, 3) or any(int(s) < 1 for s in p.patch_size):
            raise ModelLoadError(f"params.patch_size must be 2 or 3 positive sizes, not {list(p.patch_size)}")
        if p.activation not in ("softmax", "sigmoid"):
            raise ModelLoadError(f"params.activation must be 'softmax' or 'sigmoid', not {p.activation!r}")
        if not 0 <= float(p.overlap) < 1:
            raise ModelLoadError("params.overlap must be in [0, 1)")
        return p


def _normalization(spec: dict | None, channels: int):
    """The MONAI dictionary transform for an intensity normalisation spec (None for "none")."""
    from monai.transforms import NormalizeIntensityd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

    spec = dict(spec or {"method": "none"})
    method = spec.pop("method")
    b_min, b_max = float(spec.get("b_min", 0.0)), float(spec.get("b_max", 1.0))
    if method == "zscore":
        return NormalizeIntensityd(keys="image", nonzero=bool(spec.get("nonzero", False)), channel_wise=channels > 1)
    if method == "percentile":
        return ScaleIntensityRangePercentilesd(keys="image", lower=float(spec.get("lower", 0.5)),
                                               upper=float(spec.get("upper", 99.5)), b_min=b_min, b_max=b_max,
                                               clip=True, channel_wise=channels > 1)
    if method == "window":
        center, width = float(spec["center"]), float(spec["width"])
        return ScaleIntensityRanged(keys="image", a_min=center - width / 2, a_max=center + width / 2,
                                    b_min=b_min, b_max=b_max, clip=True)
    if method == "range":
        return ScaleIntensityRanged(keys="image", a_min=float(spec["a_min"]), a_max=float(spec["a_max"]),
                                    b_min=b_min, b_max=b_max, clip=True)
    return None


def _labels(p: TorchScriptParams):
    """A transform from the discretised prediction to label values (one channel)."""
    def to_labels(prediction: torch.Tensor) -> torch.Tensor:
        if p.activation == "softmax":  # argmax already gave channel indices
            if not p.label_values:
                return prediction
            lookup = torch.tensor([0, *p.label_values[1:]], dtype=prediction.dtype)
            return lookup[prediction.long()]
        values = p.label_values or tuple(range(1, prediction.shape[0] + 1))
        labels = torch.zeros_like(prediction[:1])
        for channel, value in enumerate(values[: prediction.shape[0]]):
            labels[prediction[channel: channel + 1] > 0] = value
        return labels
    return to_labels


def build_pipeline(p: TorchScriptParams, network: Any, device: torch.device, sw_batch_size: int | None = None,
                   overlap: float | None = None) -> MonaiPipeline:
    """The MONAI transforms and inferer the params describe, around ``network``."""
    from monai.inferers import SliceInferer, SlidingWindowInferer
    from monai.transforms import (Activationsd, AsDiscreted, Compose, EnsureTyped, Invertd, Lambdad,
                                  Orientationd, Spacingd)

    steps: list = []
    if p.orientation:
        steps.append(Orientationd(keys="image", axcodes=p.orientation, labels=None))
    if p.spacing:
        steps.append(Spacingd(keys="image", pixdim=[float(s) for s in p.spacing], mode="bilinear",
                              dtype=torch.float32))
    normalise = _normalization(p.normalization, len(p.channels))
    if normalise is not None:
        steps.append(normalise)
    steps.append(EnsureTyped(keys="image", dtype=torch.float32))
    preprocessing = Compose(steps)

    window = dict(roi_size=[int(s) for s in p.patch_size], sw_batch_size=int(sw_batch_size or p.sw_batch_size),
                  overlap=float(p.overlap if overlap is None else overlap), mode=p.blend)
    inferer = SliceInferer(spatial_dim=2, **window) if len(p.patch_size) == 2 else SlidingWindowInferer(**window)

    discrete = (AsDiscreted(keys="pred", argmax=True) if p.activation == "softmax"
                else AsDiscreted(keys="pred", threshold=float(p.threshold)))
    postprocessing = Compose([
        Activationsd(keys="pred", softmax=p.activation == "softmax", sigmoid=p.activation == "sigmoid"),
        Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
        discrete,
        Lambdad(keys="pred", func=_labels(p)),
    ])
    return MonaiPipeline(preprocessing=preprocessing, network=network, inferer=inferer,
                         postprocessing=postprocessing, device=device)


class TorchScriptModel:
    """A TorchScript segmentation network described by a manifest (see ``TorchScriptParams``).

    Discovery adds ``folder`` (the model folder) and ``sha256`` (manifest.json + weights, checked again here).
    """

    def __init__(self, info: ModelInfo, params: dict[str, Any]) -> None:
        self.info = info
        if params.get("unavailable_reason"):
            raise ModelLoadError(f"model {info.id} is unavailable: {params['unavailable_reason']}")
        self.params = TorchScriptParams.from_dict(params)
        folder = Path(params.get("folder", "."))
        path = folder / self.params.model
        if not path.is_file():
            raise ModelLoadError(f"TorchScript file {path} is missing")
        expected = params.get("sha256")
        if expected and files_checksum(folder, sorted({"manifest.json", self.params.model})) != expected:
            raise ModelLoadError(f"the files of model {info.id} in {folder} changed after it was approved; "
                                 "reload the models and approve it again")
        self.device = select_device(self.params.device)
        try:
            network = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as exc:  # TorchScript raises RuntimeError or ValueError for foreign files
            raise ModelLoadError(f"{path} cannot be loaded as TorchScript ({type(exc).__name__}: {exc})") from exc
        self.pipeline = build_pipeline(self.params, network, self.device, params.get("sw_batch_size"),
                                       params.get("overlap"))

    def segment(self, volume: Volume, progress: ProgressCallback) -> SegmentationResult:
        """Label map (uint8, on the grid of ``volume``) for a single-channel model."""
        return self.segment_channels([volume], progress)

    def segment_channels(self, volumes: Sequence[Volume], progress: ProgressCallback) -> SegmentationResult:
        """Label map on the grid of ``volumes[0]``; one series per channel, in the order of ``params.channels``."""
        if len(volumes) != len(self.params.channels):
            from inference.models.base import InputNotSupported
            raise InputNotSupported(f"{self.info.name} needs {len(self.params.channels)} series "
                                    f"({', '.join(self.params.channels)}), got {len(volumes)}")
        return self.pipeline.segment(self.info, list(volumes), progress)
