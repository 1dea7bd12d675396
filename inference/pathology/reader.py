"""Open a whole-slide image, whatever its format, behind one small OpenSlide-shaped API.

The format is detected from the content (magic bytes, then the readers themselves), never from the file
name. Backends, fastest first for each format (measured in ``../shared/research/WSI.md`` §3):

- tiffslide: Aperio SVS, generic pyramidal TIFF, OME-TIFF, Leica SCN (3–10× faster than OpenSlide on block reads);
- OpenSlide 4 (openslide-bin): Hamamatsu NDPI, MIRAX, Ventana BIF, Philips TIFF, single DICOM files, and
  any TIFF that tiffslide cannot read;
- wsidicom: a folder of DICOM WSI instances (one pyramid), e.g. a series downloaded from Orthanc.

Every read returns RGB ``uint8`` numpy arrays; pixels outside the slide are white, whatever the backend.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("inference.pathology.reader")

__all__ = ["CorruptSlide", "Level", "Slide", "SlideError", "SlideMetadata", "UnsupportedSlide", "open_slide",
           "sniff_format"]


class SlideError(Exception):
    """A slide cannot be processed; the message is a sentence for the user."""


class UnsupportedSlide(SlideError):
    """The content is not a whole-slide image format we read (a PNG, a PDF, a text file…)."""


class CorruptSlide(SlideError):
    """The content looks like a slide format but cannot be read (truncated, damaged)."""


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float


@dataclass(frozen=True)
class SlideMetadata:
    """What a slide says about itself; ``mpp`` is ``None`` when the file does not state a pixel size."""

    width: int
    height: int
    levels: tuple[Level, ...]
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    vendor: str | None
    scanner: str | None
    format: str
    backend: str
    properties: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict:
        mpp = self.mpp_x
        return {
            "width_px": self.width, "height_px": self.height,
            "width_mm": round(self.width * mpp / 1000, 4) if mpp else None,
            "height_mm": round(self.height * (self.mpp_y or mpp) / 1000, 4) if mpp else None,
            "mpp_x": self.mpp_x, "mpp_y": self.mpp_y, "magnification": self.objective_power,
            "vendor": self.vendor, "scanner": self.scanner, "format": self.format, "reader": self.backend,
            "levels": [{"width_px": lv.width, "height_px": lv.height, "downsample": round(lv.downsample, 4)}
                       for lv in self.levels],
        }


class _Backend(Protocol):
    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``level``; (x, y) in *level* pixels, entirely inside the level."""

    def close(self) -> None: ...


# -- format detection ---------------------------------------------------------------------------------
_NOT_SLIDES = {
    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"%PDF": "a PDF document",
    b"GIF8": "a GIF image", b"PK\x03\x04": "a ZIP archive", b"\x1f\x8b": "a gzip archive",
    b"BM": "a BMP image",
}


def sniff_format(path: Path) -> str:
    """``tiff``, ``bigtiff``, ``dicom``, ``dicom-folder`` or ``other`` (OpenSlide may still know it),
    from the first bytes of the content. Raises :class:`UnsupportedSlide` for known non-slide formats."""
    path = Path(path)
    if path.is_dir():
        if any(_is_dicom(p) for p in sorted(path.iterdir())[:50] if p.is_file()):
            return "dicom-folder"
        raise UnsupportedSlide(f"the folder {path.name} holds no DICOM files")
    with open(path, "rb") as f:
        head = f.read(132)
    if len(head) < 8:
        raise CorruptSlide(f"the file is empty or truncated ({len(head)} bytes)")
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        return "bigtiff"
    if head[128:132] == b"DICM":
        return "dicom"
    for magic, what in _NOT_SLIDES.items():
        if head.startswith(magic):
            raise UnsupportedSlide(f"the file is {what}, not a whole-slide image")
    return "other"


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


# -- backends -----------------------------------------------------------------------------------------
class _TiffSlideBackend:
    """tiffslide, with its tiled levels read directly: each tile's bytes (``os.pread``, thread-safe) decoded by
    tifffile's own decoder (what tiffslide's zarr store calls) straight into the region, without zarr's
    per-read overhead (≈ 1.4× faster on block reads). Levels that are not one plain tiled page (stripped,
    planar, composited series…) and files without a descriptor go through tiffslide."""

    def __init__(self, path: Path) -> None:
        import tiffslide

        self.slide = tiffslide.TiffSlide(str(path))
        self.version = f"tiffslide {tiffslide.__version__}"
        self._direct: dict[int, _TiledLevel | None] = {}

    def levels(self) -> tuple[Level, ...]:
        return tuple(Level(int(w), int(h), float(d)) for (w, h), d in
                     zip(self.slide.level_dimensions, self.slide.level_downsamples))

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        direct = self._direct[level] if level in self._direct else self._direct.setdefault(level, self._tiled(level))
        if direct is not None:
            return direct.read(x, y, width, height)
        return self.read_tiffslide(level, x, y, width, height)

    def read_tiffslide(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The same region through tiffslide's ``read_region`` (the reference the direct reads must equal)."""
        ds = self.slide.level_downsamples[level]
        # tiffslide wants level-0 coordinates for the origin and level pixels for the size
        return self.slide.read_region((round(x * ds), round(y * ds)), level, (width, height), as_array=True)

    def _tiled(self, level: int) -> "_TiledLevel | None":
        import os

        if not hasattr(os, "pread"):
            return None
        try:
            props = self.slide.properties
            if props.get("tiffslide.series-composition") or props.get("tiffslide.series-axes") != "YXS":
                return None
            tf = self.slide.ts_tifffile
            series_level = tf.series[props["tiffslide.series-index"]].levels[level]
            page = series_level.pages[0]
            width, height = self.slide.level_dimensions[level]
            if (len(series_level.pages) != 1 or not getattr(page, "is_tiled", False) or page.planarconfig != 1
                    or page.imagedepth != 1 or page.dtype != np.uint8 or tuple(series_level.shape) != (height, width, 3)
                    or tuple(page.shape) != (height, width, 3)):
                return None
            fill = self.slide.zarr_group[str(level)].fill_value
            return _TiledLevel(page, tf.filehandle.fileno(), int(fill or 0))
        except Exception:  # anything unusual: tiffslide reads it
            return None

    def properties(self) -> dict[str, Any]:
        return dict(self.slide.properties)

    def close(self) -> None:
        self.slide.close()


class _TiledLevel:
    """One tiled, interleaved 8-bit RGB TIFF page, read tile by tile."""

    def __init__(self, page: Any, fd: int, fill: int) -> None:
        self.page, self.fd, self.fill = page, fd, fill
        self.height, self.width = page.shape[:2]
        self.tile_h, self.tile_w = page.tilelength, page.tilewidth
        self.across = -(-self.width // self.tile_w)
        self.offsets, self.counts = page.dataoffsets, page.databytecounts
        self.decode = page.decode
        self.args: dict[str, Any] = {"_fullsize": True}
        if page.jpegtables is not None:
            self.args["jpegtables"] = page.jpegtables
        if getattr(page, "jpegheader", None) is not None:
            self.args["jpegheader"] = page.jpegheader

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB (height, width, 3); (x, y) in level pixels, the region entirely inside the level."""
        import os

        th, tw = self.tile_h, self.tile_w
        out = np.empty((height, width, 3), np.uint8)
        for ty in range(y // th, (y + height - 1) // th + 1):
            for tx in range(x // tw, (x + width - 1) // tw + 1):
                index = ty * self.across + tx
                y0, x0 = max(y, ty * th), max(x, tx * tw)  # the overlap, in level pixels
                y1, x1 = min(y + height, (ty + 1) * th), min(x + width, (tx + 1) * tw)
                target = out[y0 - y:y1 - y, x0 - x:x1 - x]
                offset, count = self.offsets[index], self.counts[index]
                if not offset or not count:  # a tile the file does not store
                    target[...] = self.fill
                    continue
                tile = self.decode(os.pread(self.fd, count, offset), index, **self.args)[0]
                target[...] = tile.reshape(th, tw, 3)[y0 - ty * th:y1 - ty * th, x0 - tx * tw:x1 - tx * tw]
        return out


class _OpenSlideBackend:
    def __init__(self, path: Path) -> None:
        import openslide

        self.slide = openslide.OpenSlide(str(path))
        self.version = f"openslide {openslide.__library_version__} (openslide-python {openslide.__version__})"

    def levels(self) -> tuple[Level, ...]:
        return tuple(Level(int(w), int(h), float(d)) for (w, h), d in
                     zip(self.slide.level_dimensions, self.slide.level_downsamples))

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self.slide.level_downsamples[level]
        rgba = np.asarray(self.slide.read_region((round(x * ds), round(y * ds)), level, (width, height)))
        return _flatten_alpha(rgba)

    def properties(self) -> dict[str, Any]:
        return dict(self.slide.properties)

    def close(self) -> None:
        self.slide.close()


class _WsiDicomBackend:
    """wsidicom on a folder of instances; wsidicom addresses levels by log2(scale), regions in level pixels."""

    def __init__(self, path: Path) -> None:
        import wsidicom

        self.slide = wsidicom.WsiDicom.open(path)
        self.version = f"wsidicom {wsidicom.__version__}"
        base = self.slide.levels[0].size.width
        self._levels = [(lv.level, lv.size.width, lv.size.height, base / lv.size.width) for lv in self.slide.levels]
        self.dataset = self.slide.levels[0].datasets[0]

    def levels(self) -> tuple[Level, ...]:
        return tuple(Level(int(w), int(h), float(d)) for _, w, h, d in self._levels)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        region = self.slide.read_region((x, y), self._levels[level][0], (width, height))
        return _flatten_alpha(np.asarray(region))

    def properties(self) -> dict[str, Any]:
        mpp = self.slide.levels[0].mpp
        return {"dicom.mpp-x": mpp.width, "dicom.mpp-y": mpp.height}

    def close(self) -> None:
        self.slide.close()


def _flatten_alpha(pixels: np.ndarray) -> np.ndarray:
    """RGB on white from RGB(A) (OpenSlide returns transparent pixels outside the scanned area)."""
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    if pixels.shape[2] == 3:
        return np.ascontiguousarray(pixels)
    rgb, alpha = pixels[..., :3], pixels[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    return (rgb.astype(np.uint16) * a // 255 + (255 - a)).astype(np.uint8)


# -- the slide ----------------------------------------------------------------------------------------
class Slide:
    """An open slide: :attr:`metadata` and :meth:`read_region` (level-0 origin, level size), like OpenSlide."""

    def __init__(self, backend: Any, metadata: SlideMetadata, dicom_header: Any = None,
                 ycbcr_as_rgb: bool = False) -> None:
        self._backend = backend
        self.metadata = metadata
        self.dicom_header = dicom_header  # pydicom header of the level-0 instance of a DICOM slide
        self._ycbcr = ycbcr_as_rgb  # frames hold YCbCr although the DICOM header says RGB

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()

    @property
    def levels(self) -> tuple[Level, ...]:
        return self.metadata.levels

    def best_level(self, downsample: float) -> int:
        """The most detailed level that is not finer than needed: downsample ≤ ``downsample`` (1 % slack)."""
        best = 0
        for i, level in enumerate(self.levels):
            if level.downsample <= downsample * 1.01:
                best = i if level.downsample >= self.levels[best].downsample else best
        return best

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``level``, (x, y) in level pixels; white outside the slide."""
        lv = self.levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        if x0 == x and y0 == y and x1 == x + width and y1 == y + height:
            return self._read(level, x, y, width, height)
        out = np.full((height, width, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """OpenSlide convention: ``location`` in level-0 pixels, ``size`` (width, height) in level pixels."""
        ds = self.levels[level].downsample
        return self.read_level(level, int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds)), *size)

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        try:
            pixels = self._backend.read(level, x, y, width, height)
        except Exception as exc:  # a damaged tile deep inside the file
            raise CorruptSlide(f"the slide could not be read at level {level} ({x}, {y}): "
                               f"{type(exc).__name__}: {exc}") from exc
        if pixels.shape[:2] != (height, width):
            raise CorruptSlide(f"the reader returned {pixels.shape[:2]} pixels instead of {(height, width)}")
        if self._ycbcr:
            import cv2

            pixels = cv2.cvtColor(np.ascontiguousarray(pixels[..., [0, 2, 1]]), cv2.COLOR_YCrCb2RGB)
        return pixels


def open_slide(path: Path | str) -> Slide:
    """Open a slide file (or a folder of DICOM WSI instances), choosing the backend from the content.

    Raises :class:`UnsupportedSlide` for content that is not a slide, :class:`CorruptSlide` for a slide
    format that no reader can read.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path} does not exist")
    kind = sniff_format(path)
    attempts: list[tuple[str, type]] = []
    if kind == "dicom-folder":
        attempts = [("dicom-wsi", _WsiDicomBackend)]
    elif kind == "dicom":
        attempts = [("dicom-wsi", _OpenSlideBackend)]
    elif kind in ("tiff", "bigtiff"):
        vendor = _openslide_vendor(path)
        if vendor in (None, "aperio", "generic-tiff", "leica"):  # tiffslide reads these, faster
            attempts = [(vendor or "tiff", _TiffSlideBackend), (vendor or "tiff", _OpenSlideBackend)]
        else:  # NDPI, Philips, Ventana…: OpenSlide first
            attempts = [(vendor, _OpenSlideBackend), (vendor, _TiffSlideBackend)]
    else:
        vendor = _openslide_vendor(path)
        if vendor is None:
            raise UnsupportedSlide("the file is not a whole-slide image format that OpenSlide, tiffslide or "
                                   "wsidicom can read")
        attempts = [(vendor, _OpenSlideBackend)]
    errors = []
    for fmt, backend_type in attempts:
        try:
            backend = backend_type(path)
        except Exception as exc:
            errors.append(f"{backend_type.__name__.strip('_').replace('Backend', '')}: {type(exc).__name__}: {exc}")
            continue
        try:
            slide = _slide(backend, fmt, path, kind)
            slide.read_level(len(slide.levels) - 1, 0, 0, 1, 1)  # the cheapest read that proves decoding works
            return slide
        except SlideError as exc:
            backend.close()
            errors.append(str(exc))
        except Exception as exc:
            backend.close()
            errors.append(f"{type(exc).__name__}: {exc}")
    what = {"tiff": "a TIFF file", "bigtiff": "a BigTIFF file", "dicom": "a DICOM file",
            "dicom-folder": "a folder of DICOM files"}.get(kind, "the file")
    raise CorruptSlide(f"{what} that no slide reader could open; it may be truncated or damaged "
                       f"({'; '.join(errors)[:600]})")


def _openslide_vendor(path: Path) -> str | None:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # openslide missing or confused: tiffslide will say more
        return None


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _slide(backend: Any, fmt: str, path: Path, kind: str) -> Slide:
    levels = backend.levels()
    if not levels or levels[0].width <= 0 or levels[0].height <= 0:
        raise CorruptSlide("the slide has no image level")
    props = {str(k): str(v) for k, v in backend.properties().items() if v is not None}
    mpp_x = mpp_y = power = None
    vendor = scanner = None
    header = None
    ycbcr = False
    warnings: list[str] = []
    for prefix in ("openslide", "tiffslide", "dicom"):
        mpp_x = mpp_x or _float(props.get(f"{prefix}.mpp-x"))
        mpp_y = mpp_y or _float(props.get(f"{prefix}.mpp-y"))
        power = power or _float(props.get(f"{prefix}.objective-power"))
        vendor = vendor or props.get(f"{prefix}.vendor") or None
    if kind.startswith("dicom"):
        header, smallest = _dicom_header(path)
        vendor = None  # OpenSlide says "dicom": the manufacturer, if any, says more
        if header is not None:
            if smallest is not None and _jfif_labelled_rgb(smallest):
                ycbcr = True
                warnings.append("the DICOM slide says its JPEG frames are RGB but they are YCbCr (JFIF); "
                                "colours were converted")
            vendor = str(header.get("Manufacturer", "") or "") or None
            scanner = str(header.get("ManufacturerModelName", "") or "") or None
            for item in header.get("OpticalPathSequence", []):
                power = power or _float(item.get("ObjectiveLensPower"))
            if mpp_x is None:
                try:
                    spacing = header.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
                    mpp_y, mpp_x = float(spacing[0]) * 1000, float(spacing[1]) * 1000
                except (AttributeError, IndexError, KeyError, TypeError, ValueError):
                    pass
    else:
        scanner = props.get("aperio.ScanScope ID") or props.get("hamamatsu.Product") or None
        if scanner and vendor == "aperio":
            scanner = f"Aperio ScanScope {scanner}"
    if mpp_x and not mpp_y:
        mpp_y = mpp_x
    meta = SlideMetadata(width=levels[0].width, height=levels[0].height, levels=levels, mpp_x=mpp_x, mpp_y=mpp_y,
                         objective_power=power, vendor=vendor, scanner=scanner, format=fmt,
                         backend=backend.version, properties={k: v for k, v in props.items() if len(v) < 200},
                         warnings=tuple(warnings))
    return Slide(backend, meta, header, ycbcr_as_rgb=ycbcr)


def _dicom_header(path: Path) -> tuple[Any, Path | None]:
    """The level-0 instance's header (DICOM outputs reference it) and the smallest tiled instance's path."""
    import pydicom

    folder = path if path.is_dir() else path.parent
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and _is_dicom(p)]
    best, best_size = None, -1
    smallest, smallest_size = None, None
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        if str(ds.get("SOPClassUID", "")) != "1.2.840.10008.5.1.4.1.1.77.1.6":
            continue
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        if "LABEL" in image_type or "OVERVIEW" in image_type:
            continue
        size = int(ds.get("TotalPixelMatrixColumns", 0) or 0) * int(ds.get("TotalPixelMatrixRows", 0) or 0)
        if size > best_size:
            best, best_size = ds, size
        if smallest_size is None or size < smallest_size:
            smallest, smallest_size = f, size
    return best, smallest


def _jfif_labelled_rgb(path: Path) -> bool:
    """True when a DICOM instance says RGB but its JPEG baseline frames are JFIF/YCbCr-subsampled.

    Some converters (early Google wsi2dcm among them) wrote such files; every reader then shows false
    colours (white turns salmon), because the DICOM header tells the decoder not to convert.
    """
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(path)
    if str(ds.get("PhotometricInterpretation", "")) != "RGB":
        return False
    if str(ds.file_meta.get("TransferSyntaxUID", "")) != "1.2.840.10008.1.2.4.50":
        return False
    frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)), b"")
    if b"JFIF" in frame[:64]:
        return True
    sof = frame.find(b"\xff\xc0")
    if sof < 0 or len(frame) < sof + 19:
        return False
    sampling = frame[sof + 11]  # first component's sampling factors: 0x22 or 0x21 means chroma subsampling
    return sampling not in (0x11,)
