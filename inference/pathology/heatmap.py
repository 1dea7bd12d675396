"""The density heatmap: per-tile nuclei density over the thumbnail, with a legend and the hotspots.

The PNG has exactly the thumbnail's size (the viewer overlays them); tiles are drawn as crisp blocks
(nearest neighbour) so that a reader can see which tile a number belongs to.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["colormap", "encode_png", "render_heatmap"]

# viridis, sampled at five points (perceptually uniform, readable in greyscale and by most colour-blind eyes)
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)


def colormap() -> np.ndarray:
    """(256, 3) uint8 RGB lookup table."""
    x = np.linspace(0, len(_ANCHORS) - 1, 256)
    i = np.minimum(x.astype(int), len(_ANCHORS) - 2)
    f = (x - i)[:, None]
    return np.round(_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).astype(np.uint8)


def render_heatmap(thumb: np.ndarray, density: np.ndarray, grid_extent: tuple[float, float],
                   slide_size: tuple[int, int], *, vmax: float | None = None, rois: list[dict] | None = None,
                   alpha: float = 0.6, unit: str = "nuclei/mm2") -> np.ndarray:
    """RGB image of ``thumb``'s size: ``density`` (rows, cols; NaN = not analysed) over the thumbnail.

    ``grid_extent`` is the level-0 width and height the grid covers, ``slide_size`` the level-0 size the
    thumbnail shows. ``vmax`` defaults to the 99th percentile of the densities.
    """
    out = thumb.copy()
    h, w = thumb.shape[:2]
    rows, cols = density.shape
    valid = ~np.isnan(density)
    if rows and cols and valid.any():
        values = density[valid]
        top = float(vmax if vmax is not None else np.percentile(values, 99)) or float(values.max()) or 1.0
        index = np.clip(np.nan_to_num(density, nan=0.0) / top * 255, 0, 255).astype(np.uint8)
        colours = colormap()[index]
        gw = max(1, min(w, round(grid_extent[0] / slide_size[0] * w)))
        gh = max(1, min(h, round(grid_extent[1] / slide_size[1] * h)))
        colours = cv2.resize(colours, (gw, gh), interpolation=cv2.INTER_NEAREST)
        where = cv2.resize(valid.astype(np.uint8), (gw, gh), interpolation=cv2.INTER_NEAREST).astype(bool)
        region = out[:gh, :gw]
        blended = (region.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
        region[where] = blended[where]
        for roi in rois or []:
            x0 = round(roi["x_px"] / slide_size[0] * w)
            y0 = round(roi["y_px"] / slide_size[1] * h)
            x1 = round((roi["x_px"] + roi["width_px"]) / slide_size[0] * w)
            y1 = round((roi["y_px"] + roi["height_px"]) / slide_size[1] * h)
            cv2.rectangle(out, (x0, y0), (max(x0 + 1, x1 - 1), max(y0 + 1, y1 - 1)), (255, 255, 255), 2)
            _text(out, str(roi["rank"]), (x0 + 4, y0 + 16), 0.5)
    else:
        top = 0.0
    _legend(out, top, unit)
    return out


def _text(img: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
    cv2.putText(img, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def _legend(img: np.ndarray, top: float, unit: str) -> None:
    """A colour bar with its range in the bottom-right corner (skipped on tiny images)."""
    h, w = img.shape[:2]
    bar_w, bar_h, pad = min(160, w // 3), 10, 8
    if bar_w < 40 or h < 60:
        return
    box_w, box_h = bar_w + 2 * pad, bar_h + 34
    x0, y0 = w - box_w - pad, h - box_h - pad
    img[y0:y0 + box_h, x0:x0 + box_w] = (img[y0:y0 + box_h, x0:x0 + box_w] * 0.3 + 255 * 0.7).astype(np.uint8)
    bar = colormap()[np.linspace(0, 255, bar_w).astype(np.uint8)]
    img[y0 + pad:y0 + pad + bar_h, x0 + pad:x0 + pad + bar_w] = bar[None, :, :]
    label_y = y0 + pad + bar_h + 14
    cv2.putText(img, "0", (x0 + pad, label_y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    right = f"{top:,.0f} {unit}"
    (tw, _), _ = cv2.getTextSize(right, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    cv2.putText(img, right, (x0 + pad + bar_w - tw, label_y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                cv2.LINE_AA)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB or greyscale image (deterministic: same pixels, same bytes)."""
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, data = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()
