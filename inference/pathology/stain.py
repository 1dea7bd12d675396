"""Colour deconvolution (Ruifrok & Johnston 2001) and stain-vector estimation (Macenko et al. 2009).

Optical density is ``-log10((I + 1) / 256)``; stain concentrations are a 3×3 matrix product on it
(WSI.md §3: a matmul on OD is several times faster than ``skimage.color.rgb2hed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["HE_DAB_VECTORS", "StainEstimate", "estimate_stains", "hematoxylin_od", "optical_density"]

# Ruifrok & Johnston's H&E-DAB stain vectors (rows: hematoxylin, eosin, DAB), unit length.
HE_DAB_VECTORS = np.array([[0.650, 0.704, 0.286],
                           [0.072, 0.990, 0.105],
                           [0.268, 0.570, 0.776]], np.float32)
HE_DAB_VECTORS /= np.linalg.norm(HE_DAB_VECTORS, axis=1, keepdims=True)
_UNMIX = np.linalg.inv(HE_DAB_VECTORS).astype(np.float32)  # OD (…, 3) @ _UNMIX -> concentrations (H, E, DAB)

_OD_LUT = (-np.log10((np.arange(256, dtype=np.float32) + 1) / 256)).astype(np.float32)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel optical density (float32), by table lookup."""
    return _OD_LUT[rgb]


def hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """The hematoxylin concentration (OD units) of each pixel: the H channel of the Ruifrok deconvolution."""
    od = optical_density(rgb)
    return od @ _UNMIX[:, 0]


@dataclass(frozen=True)
class StainEstimate:
    """Macenko stain vectors of a pixel sample and how far they are from the reference H&E vectors."""

    hematoxylin: tuple[float, float, float] | None
    eosin: tuple[float, float, float] | None
    hematoxylin_angle_deg: float | None
    eosin_angle_deg: float | None
    dab_angle_deg: float | None  # angle of the second stain to DAB: small for IHC (brown) slides
    mean_od: tuple[float, float, float]
    concentrations: dict[str, dict[str, float]]  # HistoQC-style deconv means and stds
    pixels: int

    @property
    def looks_like_he(self) -> bool | None:
        """True when both estimated stains lie within 25° of hematoxylin and eosin (and the second stain is
        closer to eosin than to DAB); None when too few stained pixels were seen to tell."""
        if self.hematoxylin_angle_deg is None or self.eosin_angle_deg is None:
            return None
        return (self.hematoxylin_angle_deg <= 25 and self.eosin_angle_deg <= 25
                and (self.dab_angle_deg is None or self.eosin_angle_deg < self.dab_angle_deg))

    def to_json(self) -> dict:
        return {"hematoxylin_vector": self.hematoxylin, "eosin_vector": self.eosin,
                "hematoxylin_angle_deg": self.hematoxylin_angle_deg, "eosin_angle_deg": self.eosin_angle_deg,
                "dab_angle_deg": self.dab_angle_deg, "mean_od": self.mean_od,
                "deconvolution": self.concentrations, "pixels_sampled": self.pixels, "looks_like_he": self.looks_like_he}


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    cos = float(np.clip(abs(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))
    return round(float(np.degrees(np.arccos(cos))), 2)


def estimate_stains(rgb_pixels: np.ndarray, beta: float = 0.15, alpha: float = 1.0) -> StainEstimate:
    """Macenko: the plane of the two main OD directions, and the extreme angles (``alpha`` percentile) in it.

    ``rgb_pixels`` is an (N, 3) uint8 sample of tissue pixels. Pixels with OD < ``beta`` in any channel
    (nearly transparent) are ignored.
    """
    od = optical_density(rgb_pixels.reshape(-1, 3))
    conc = od @ _UNMIX
    concentrations = {name: {"mean": round(float(conc[:, i].mean()), 4) if len(conc) else 0.0,
                             "std": round(float(conc[:, i].std()), 4) if len(conc) else 0.0}
                      for i, name in enumerate(("hematoxylin", "eosin", "dab"))}
    mean_od = tuple(round(float(v), 4) for v in (od.mean(axis=0) if len(od) else np.zeros(3)))
    od = od[(od > beta).all(axis=1)]
    if len(od) < 100:
        return StainEstimate(None, None, None, None, None, mean_od, concentrations, int(len(od)))
    _, vectors = np.linalg.eigh(np.cov(od.T))
    plane = vectors[:, 1:3]  # the two largest eigenvalues
    if plane[0, 1] < 0:  # make the main direction point into positive OD
        plane[:, 1] *= -1
    if plane[0, 0] < 0:
        plane[:, 0] *= -1
    projected = od @ plane
    phi = np.arctan2(projected[:, 0], projected[:, 1])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.sin(lo), np.cos(lo)])
    v2 = plane @ np.array([np.sin(hi), np.cos(hi)])
    v1, v2 = (v1 if v1.sum() > 0 else -v1), (v2 if v2.sum() > 0 else -v2)
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)  # hematoxylin absorbs more red than eosin
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    return StainEstimate(
        hematoxylin=tuple(round(float(v), 4) for v in h), eosin=tuple(round(float(v), 4) for v in e),
        hematoxylin_angle_deg=_angle(h, HE_DAB_VECTORS[0]), eosin_angle_deg=_angle(e, HE_DAB_VECTORS[1]),
        dab_angle_deg=_angle(e, HE_DAB_VECTORS[2]), mean_od=mean_od, concentrations=concentrations,
        pixels=int(len(od)))
