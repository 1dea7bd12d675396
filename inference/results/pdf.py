"""PDF report (reportlab) and its DICOM wrapper (Encapsulated PDF Storage).

The report is what a clinician without a DICOM viewer reads: who and what was analysed, by which model
(and how good it is, or that it is only a demonstration), the findings with their measurements, key
images with the contours drawn, and on every page that the results are unverified until a clinician
signs them. Every user-visible string comes from ``templates/`` so that a site can translate or
rebrand the report without touching code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import pydicom
from PIL import Image as PILImage
from PIL import ImageDraw
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import PersonName
from reportlab import rl_config
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import simpleSplit
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Flowable, Image, KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle
from skimage.measure import find_contours

from inference import __version__
from inference.models.base import ModelInfo
from inference.results.findings import Finding
from inference.results.identity import DEVICE_SERIAL_NUMBER, MANUFACTURER, series_description as _series_description
from inference.volume import Volume

# Binary (Flate only) image and page streams: ASCII85 makes them 25 % larger and reportlab encodes it in pure
# Python (a third of the report's writing time for three key images). Every PDF reader takes binary streams.
rl_config.useA85 = 0

__all__ = [
    "ENCAPSULATED_PDF_STORAGE",
    "render_key_image",
    "render_report_pdf",
    "supported_languages",
    "write_pdf_report",
]

log = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
FALLBACK_LANGUAGE = "en"  # strings missing from a site's own language file come from English
REPORT_CONCEPT = codes.LN.DiagnosticImagingReport  # (18748-4, LN, "Diagnostic Imaging Report"), CID 7000

_KEY_IMAGE_PIXELS = 512  # longer side of a key image PNG: ~160 dpi at the printed size
_DEFAULT_CONTOUR_COLOUR = (255, 215, 0)
_MARKER_COLOUR = (255, 255, 0)
_FONT_SIZE = 9.0
_MARGIN = 18 * mm
_FRAME_PADDING = 6.0  # reportlab's default Frame padding, in points
_FRAME_WIDTH = A4[0] - 2 * _MARGIN - 2 * _FRAME_PADDING  # what the story's tables may use


# --- templates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    """Site settings and the strings of one language, after defaults and overrides are merged."""

    language: str
    settings: dict[str, Any]
    strings: dict[str, Any]
    logo: Path | None
    fonts: tuple[Path, Path] | None  # (regular, bold) TrueType files, or None for Helvetica


def supported_languages(template_dir: Path | None = None) -> tuple[str, ...]:
    """Languages with a strings file in the default templates or in the site's ``template_dir``."""
    folders = [DEFAULT_TEMPLATE_DIR / "i18n"] + ([Path(template_dir) / "i18n"] if template_dir else [])
    return tuple(sorted({path.stem for folder in folders if folder.is_dir() for path in folder.glob("*.json")}))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"Report template {path} is not valid JSON ({exc}); fix or remove it.") from exc
    if not isinstance(data, dict):
        raise ValueError(f"Report template {path} must hold a JSON object, not {type(data).__name__}.")
    return data


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, recursively for nested objects (so a site can change one colour)."""
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


def _load_template(template_dir: Path | None, language: str | None) -> _Template:
    """Merge default and site templates; refuse a language that has no strings file."""
    site = Path(template_dir) if template_dir is not None else None
    default_settings = _read_json(DEFAULT_TEMPLATE_DIR / "report.json")
    site_settings = _read_json(site / "report.json") if site else {}
    settings = _merged(default_settings, site_settings)

    language = (language or str(settings.get("default_language") or FALLBACK_LANGUAGE)).strip().lower()
    languages = supported_languages(site)
    if language not in languages:
        raise ValueError(f"Report language {language!r} is not supported; supported languages: {', '.join(languages)}.")
    strings: dict[str, Any] = _read_json(DEFAULT_TEMPLATE_DIR / "i18n" / f"{FALLBACK_LANGUAGE}.json")
    for folder in [DEFAULT_TEMPLATE_DIR] + ([site] if site else []):
        strings = _merged(strings, _read_json(folder / "i18n" / f"{language}.json"))

    def resolved(name: str, overridden: bool) -> Path:
        # A relative path is relative to the folder whose report.json names it.
        path = Path(name).expanduser()
        return path if path.is_absolute() else (site if site and overridden else DEFAULT_TEMPLATE_DIR) / path

    logo = None
    if settings.get("logo"):
        logo = resolved(str(settings["logo"]), bool(site_settings.get("logo")))
        if not logo.is_file():
            log.warning("Report logo %s not found; the report is rendered without a logo.", logo)
            logo = None

    fonts = None
    font_settings, site_fonts = settings.get("fonts") or {}, site_settings.get("fonts") or {}
    if font_settings.get("regular"):
        regular = resolved(str(font_settings["regular"]), bool(site_fonts.get("regular")))
        bold_name = font_settings.get("bold")
        bold = resolved(str(bold_name), bool(site_fonts.get("bold"))) if bold_name else regular
        for path in (regular, bold):
            if not path.is_file():
                raise ValueError(f"Report font {path} (report.json \"fonts\") does not exist; fix or remove it.")
        fonts = (regular, bold)
    return _Template(language=language, settings=settings, strings=strings, logo=logo, fonts=fonts)


# TrueType fonts tried when the report holds text that Helvetica cannot show and the site configured none.
_FALLBACK_FONTS = tuple(
    (Path(folder) / "DejaVuSans.ttf", Path(folder) / "DejaVuSans-Bold.ttf")
    for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/TTF", "/usr/share/fonts/dejavu")
)


def _fonts(template: _Template, texts: Sequence[str]) -> tuple[str, str]:
    """(regular, bold) font names: the site's TrueType fonts if configured, else Helvetica.

    Helvetica's encoding (cp1252) covers French and most Western European names. A name it cannot show
    would print as black boxes, a patient-identification hazard, so then a system DejaVu Sans is used
    if there is one (sites with other scripts should configure a font in report.json "fonts").
    """
    paths = template.fonts
    if paths is None:
        unprintable = sorted({c for text in texts for c in text if not _in_cp1252(c)})
        if not unprintable:
            return "Helvetica", "Helvetica-Bold"
        paths = next(((r, b) for r, b in _FALLBACK_FONTS if r.is_file() and b.is_file()), None)
        if paths is None:
            log.warning("The report holds characters Helvetica cannot show (%s) and no TrueType font is configured "
                        "(report.json \"fonts\"); they will print as boxes.", "".join(unprintable[:20]))
            return "Helvetica", "Helvetica-Bold"
    names = []
    for path in paths:
        name = "ReportFont-" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        if name not in pdfmetrics.getRegisteredFontNames():
            pdfmetrics.registerFont(TTFont(name, str(path)))
        names.append(name)
    pdfmetrics.registerFontFamily(names[0], normal=names[0], bold=names[1], italic=names[0], boldItalic=names[1])
    return names[0], names[1]


def _in_cp1252(character: str) -> bool:
    try:
        character.encode("cp1252")
    except UnicodeEncodeError:
        return False
    return True


# --- formatting ---------------------------------------------------------------------------------


def _number(value: Any, digits: int, decimal: str, missing: str, *, signed: bool = False) -> str:
    """A measurement as printed in the tables: fixed decimals, the language's decimal separator."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return missing
    if not math.isfinite(number):
        return missing
    text = f"{number:+.{digits}f}" if signed else f"{number:.{digits}f}"
    return text.replace(".", decimal)


def _dicom_date(value: Any, date_format: str, missing: str) -> str:
    text = str(value or "").strip()
    if not text:
        return missing
    try:
        return datetime.strptime(text[:8], "%Y%m%d").strftime(date_format)
    except ValueError:
        return text  # partial or odd dates are shown as stored rather than hidden


def _person_name(value: Any, missing: str) -> str:
    """DICOM PN → "FAMILY, Given Middle" (the alphabetic group), the way reports usually print names."""
    if not value:
        return missing
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    family = str(name.family_name or "").strip()
    given = " ".join(part for part in (str(name.given_name or ""), str(name.middle_name or "")) if part.strip())
    if not family and not given:
        return str(value).replace("^", " ").strip() or missing
    return ", ".join(part for part in (family.upper(), given.strip()) if part)


# --- key images ---------------------------------------------------------------------------------


def _segment_colours(model: ModelInfo) -> dict[int, tuple[int, int, int]]:
    return {segment.label: tuple(int(c) for c in segment.color) for segment in model.segments}  # type: ignore[misc]


def render_key_image(
    volume: Volume, labels: np.ndarray, finding: Finding, model: ModelInfo, *, size: int = _KEY_IMAGE_PIXELS
) -> bytes:
    """PNG of the finding's key slice: windowed 1st–99th percentile, label contours in segment colours.

    Pixels are resampled to be square in millimetres (in-plane spacing), so shapes look as they are;
    an arrow points at the finding's centroid so that it is told apart from other lesions on the slice.
    """
    k = int(finding.key_slice)
    if not 0 <= k < volume.shape[0]:
        raise ValueError(f"Key slice {k} of {finding.tracking_id} is outside the volume (0..{volume.shape[0] - 1}).")
    plane = volume.array[k].astype(np.float32, copy=False)
    low, high = np.percentile(plane, [1.0, 99.0])
    scale = 255.0 / (high - low) if high > low else 0.0
    grey = np.clip((plane - low) * scale, 0, 255).astype(np.uint8)

    rows, columns = plane.shape
    _, row_spacing, column_spacing = volume.spacing
    height_mm, width_mm = rows * row_spacing, columns * column_spacing
    pixel_mm = max(height_mm, width_mm) / size
    width, height = max(1, round(width_mm / pixel_mm)), max(1, round(height_mm / pixel_mm))
    image = PILImage.fromarray(grey, mode="L").resize((width, height), PILImage.Resampling.BILINEAR).convert("RGB")
    draw = ImageDraw.Draw(image)
    sx, sy = width / columns, height / rows
    line = max(1, round(size / 256))

    colours = _segment_colours(model)
    plane_labels = labels[k]
    for value in sorted(int(v) for v in np.unique(plane_labels) if v):
        # Pad so that masks touching the border still give closed contours.
        mask = np.pad(plane_labels == value, 1).astype(np.float32)
        colour = colours.get(value, _DEFAULT_CONTOUR_COLOUR)
        for contour in find_contours(mask, 0.5):
            points = [((c - 1 + 0.5) * sx, (r - 1 + 0.5) * sy) for r, c in contour]
            if len(points) > 1:
                draw.line(points, fill=colour, width=line, joint="curve")

    _draw_arrow(draw, finding, (sx, sy), (width, height), pixel_mm, line)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _draw_arrow(
    draw: ImageDraw.ImageDraw,
    finding: Finding,
    scale: tuple[float, float],
    size: tuple[int, int],
    pixel_mm: float,
    line: int,
) -> None:
    """An arrow from outside the lesion towards its centroid, from the side with the most room."""
    _, row, column = finding.centroid_index
    if not (math.isfinite(row) and math.isfinite(column)):
        return
    x, y = (column + 0.5) * scale[0], (row + 0.5) * scale[1]
    radius_mm = (finding.max_3d_diameter_mm or 0.0) / 2 if math.isfinite(finding.max_3d_diameter_mm or 0.0) else 0.0
    gap = (radius_mm + 3.0) / pixel_mm
    length = 12.0 / pixel_mm
    dx = -1.0 if x > size[0] / 2 else 1.0  # point from the nearer-to-centre side, so the arrow stays inside
    dy = -1.0 if y > size[1] / 2 else 1.0
    ux, uy = dx / math.sqrt(2), dy / math.sqrt(2)
    tip = (x + ux * gap, y + uy * gap)
    tail = (tip[0] + ux * length, tip[1] + uy * length)
    head = 4.0 / pixel_mm
    left = (tip[0] + head * (ux * 0.9 - uy * 0.5), tip[1] + head * (uy * 0.9 + ux * 0.5))
    right = (tip[0] + head * (ux * 0.9 + uy * 0.5), tip[1] + head * (uy * 0.9 - ux * 0.5))
    draw.line([tail, tip], fill=_MARKER_COLOUR, width=line)
    draw.polygon([tip, left, right], fill=_MARKER_COLOUR)


# --- page furniture -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _PageFurniture:
    """What is drawn on every page, outside the flowing story."""

    unverified: str
    demonstration: str | None
    generated: str
    page: str  # with {page} and {pages}
    running_header: str
    font: str
    bold: str
    muted: colors.Color
    warning: colors.Color


def _canvas_maker(furniture: _PageFurniture):
    """A canvas class that defers pages so the footer can say "page N of M"."""

    class _ReportCanvas(Canvas):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []

        def showPage(self) -> None:  # noqa: N802 (reportlab's name)
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            for number, state in enumerate(self._pages, start=1):
                self.__dict__.update(state)
                self._draw_furniture(number, len(self._pages))
                super().showPage()
            super().save()

        def _draw_furniture(self, number: int, pages: int) -> None:
            width, _ = self._pagesize
            left, right = _MARGIN + _FRAME_PADDING, width - _MARGIN - _FRAME_PADDING
            self.saveState()
            self.setStrokeColor(furniture.muted)
            self.setLineWidth(0.5)
            self.line(left, 19 * mm, right, 19 * mm)
            y = 15.5 * mm
            if furniture.demonstration:
                self.setFont(furniture.bold, 8)
                self.setFillColor(furniture.warning)
                self.drawString(left, y, furniture.demonstration)
                y -= 3.6 * mm
            self.setFont(furniture.font, 7.5)
            self.setFillColor(furniture.muted)
            for text in simpleSplit(furniture.unverified, furniture.font, 7.5, right - left):
                self.drawString(left, y, text)
                y -= 3.3 * mm
            self.drawString(left, y, furniture.generated)
            self.drawRightString(right, y, furniture.page.format(page=number, pages=pages))
            if number > 1:  # pages get separated: each names its patient
                self.setFont(furniture.font, 7.5)
                self.drawString(left, A4[1] - 11 * mm, furniture.running_header)
            self.restoreState()

    return _ReportCanvas


class _Banner(Flowable):
    """A full-width coloured box with one line of bold text: the demonstration warning."""

    def __init__(self, text: str, font: str, colour: colors.Color, background: colors.Color) -> None:
        super().__init__()
        self.text, self.font, self.colour, self.background = text, font, colour, background

    def wrap(self, available_width: float, available_height: float) -> tuple[float, float]:
        self.width = available_width
        self.lines = simpleSplit(self.text, self.font, 11, available_width - 8 * mm)
        self.height = 5 * mm + 5 * mm * len(self.lines)
        return self.width, self.height

    def draw(self) -> None:
        canvas = self.canv
        canvas.setFillColor(self.background)
        canvas.setStrokeColor(self.colour)
        canvas.setLineWidth(1.5)
        canvas.rect(0, 0, self.width, self.height, fill=1, stroke=1)
        canvas.setFillColor(self.colour)
        canvas.setFont(self.font, 11)
        y = self.height - 6.5 * mm
        for text in self.lines:
            canvas.drawCentredString(self.width / 2, y, text)
            y -= 5 * mm


# --- the report ---------------------------------------------------------------------------------


def render_report_pdf(
    volume: Volume,
    labels: np.ndarray,
    findings: Sequence[Finding],
    model: ModelInfo,
    *,
    language: str | None = None,
    template_dir: Path | None = None,
    comparison: Sequence[Mapping[str, Any]] | None = None,
    response: str | None = None,
    max_key_images: int = 3,
    generated_at: datetime | None = None,
) -> bytes:
    """The A4 report as PDF bytes.

    ``language`` defaults to the template's ``default_language``; an unknown one raises ``ValueError``
    naming those supported. ``comparison`` items hold ``tracking_id``, ``prior_volume_ml``,
    ``current_volume_ml``, ``change_percent`` and ``status``; ``response`` is a one-line overall response.
    """
    if labels.shape != volume.array.shape:
        raise ValueError(f"Label map shape {labels.shape} differs from the volume shape {volume.array.shape}.")
    template = _load_template(template_dir, language)
    strings, settings = template.strings, template.settings
    palette = _palette(settings)
    generated_at = generated_at or datetime.now().astimezone()
    source = volume.datasets[0] if volume.datasets else pydicom.Dataset()
    font, bold = _fonts(template, _printed_texts(template, source, volume, findings, model, comparison, response))
    missing = str(strings["missing"])

    styles = _styles(font, bold, palette)
    story: list[Flowable] = []
    story += _header(template, source, styles, palette)
    if model.demonstration:
        story += [_Banner(strings["demonstration_banner"], bold, palette["warning"], palette["warning_background"]),
                  Spacer(1, 3 * mm)]
    story += _identification(strings, source, volume, styles, missing)
    story += _model_section(strings, model, styles)
    story += _findings_section(strings, findings, styles, palette, missing)
    if comparison or response:
        story += _comparison_section(strings, comparison or [], response, styles, palette, missing)
    story += _key_images_section(strings, volume, labels, findings, model, styles, max_key_images)

    model_label = f"{model.name} {model.version}".strip()
    furniture = _PageFurniture(
        unverified=strings["footer_unverified"].format(model=model_label),
        demonstration=strings["footer_demonstration"] if model.demonstration else None,
        generated=strings["footer_generated"].format(date=generated_at.strftime(strings["datetime_format"])),
        page=strings["footer_page"],
        running_header=" · ".join(
            text for text in (
                _person_name(source.get("PatientName"), ""),
                str(source.get("PatientID", "") or ""),
                _dicom_date(source.get("StudyDate"), strings["date_format"], ""),
                strings["title"],
            ) if text
        ),
        font=font,
        bold=bold,
        muted=palette["muted"],
        warning=palette["warning"],
    )
    buffer = io.BytesIO()
    document = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=_MARGIN,
        rightMargin=_MARGIN,
        topMargin=15 * mm,
        bottomMargin=(30 if model.demonstration else 26) * mm,
        title=strings["title"],
        author=MANUFACTURER,
        subject=f"{strings['title']} — {model_label}",
        creator=f"orthanc-ai {__version__}",
        lang=template.language,
    )
    document.build(story, canvasmaker=_canvas_maker(furniture))
    return buffer.getvalue()


def _palette(settings: Mapping[str, Any]) -> dict[str, colors.Color]:
    palette = {}
    for name, value in (settings.get("colours") or {}).items():
        try:
            palette[name] = colors.HexColor(str(value))
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"Report colour {name!r} = {value!r} (report.json \"colours\") is not a #RRGGBB colour."
            ) from exc
    return palette


def _printed_texts(template: _Template, source: pydicom.Dataset, volume: Volume, findings: Sequence[Finding],
                   model: ModelInfo, comparison: Sequence[Mapping[str, Any]] | None, response: str | None) -> list[str]:
    """Every text the report may print, to choose a font that can show all of them."""
    texts = [str(value) for value in template.strings.values() if isinstance(value, str)]
    texts += [str(template.settings.get(key) or "") for key in ("institution_name", "department")]
    texts += [str(source.get(keyword, "") or "") for keyword in
              ("PatientName", "PatientID", "StudyDescription", "AccessionNumber", "InstitutionName", "SeriesNumber")]
    texts += [volume.series_description, volume.modality, model.name, model.version, model.id, model.description,
              model.trained_on, model.accuracy, response or ""]
    texts += [text for finding in findings for text in (finding.tracking_id, finding.segment_name, finding.location)]
    texts += [str(item.get(key) or "") for item in comparison or () for key in ("tracking_id", "status")]
    return texts


def _styles(font: str, bold: str, palette: Mapping[str, colors.Color]) -> dict[str, ParagraphStyle]:
    base = ParagraphStyle("body", fontName=font, fontSize=_FONT_SIZE, leading=_FONT_SIZE * 1.25,
                          textColor=palette["text"])
    return {
        "body": base,
        "small": ParagraphStyle("small", parent=base, fontSize=7.5, leading=9.5, textColor=palette["muted"]),
        "label": ParagraphStyle("label", parent=base, fontName=bold, textColor=palette["muted"]),
        "cell": ParagraphStyle("cell", parent=base, fontSize=8.5, leading=10.5),
        "cell_right": ParagraphStyle("cell_right", parent=base, fontSize=8.5, leading=10.5, alignment=2),
        "head": ParagraphStyle("head", parent=base, fontName=bold, fontSize=8, leading=10,
                               textColor=palette["primary"]),
        "head_right": ParagraphStyle("head_right", parent=base, fontName=bold, fontSize=8, leading=10,
                                     textColor=palette["primary"], alignment=2),
        "title": ParagraphStyle("title", parent=base, fontName=bold, fontSize=16, leading=20,
                                textColor=palette["primary"]),
        "institution": ParagraphStyle("institution", parent=base, fontName=bold, fontSize=11, leading=14),
        "section": ParagraphStyle("section", parent=base, fontName=bold, fontSize=11, leading=14,
                                  textColor=palette["primary"], spaceBefore=4 * mm, spaceAfter=1.5 * mm),
        "caption": ParagraphStyle("caption", parent=base, fontSize=7.5, leading=9.5, alignment=TA_CENTER),
        "warning": ParagraphStyle("warning", parent=base, fontName=bold, textColor=palette["warning"]),
    }


def _text(value: Any) -> str:
    """Data (patient name, descriptions) made safe for reportlab's paragraph markup."""
    return escape(" ".join(str(value).split()))


def _header(template: _Template, source: pydicom.Dataset, styles: Mapping[str, ParagraphStyle],
            palette: Mapping[str, colors.Color]) -> list[Flowable]:
    """Institution (template, else the source's Institution Name), department, logo, report title."""
    settings = template.settings
    institution = str(settings.get("institution_name") or source.get("InstitutionName", "") or "")
    department = str(settings.get("department") or "")
    left: list[Flowable] = []
    if institution:
        left.append(Paragraph(_text(institution), styles["institution"]))
    if department:
        left.append(Paragraph(_text(department), styles["body"]))
    left.append(Paragraph(_text(template.strings["title"]), styles["title"]))
    right: Flowable | str = ""
    if template.logo:
        try:
            with PILImage.open(template.logo) as logo:
                aspect = logo.height / logo.width
            height = 18 * mm
            right = Image(str(template.logo), width=min(50 * mm, height / aspect), height=min(height, 50 * mm * aspect))
        except (OSError, ValueError) as exc:
            log.warning("Report logo %s could not be read (%s); the report is rendered without a logo.",
                        template.logo, exc)
    table = Table([[left, right]], colWidths=["70%", "30%"])
    table.setStyle(TableStyle([
        ("VALIGN", (0, 0), (-1, -1), "BOTTOM"),
        ("ALIGN", (1, 0), (1, 0), "RIGHT"),
        ("LINEBELOW", (0, 0), (-1, 0), 1.2, palette["primary"]),
        ("LEFTPADDING", (0, 0), (-1, -1), 0),
        ("RIGHTPADDING", (0, 0), (-1, -1), 0),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 3 * mm),
    ]))
    return [table, Spacer(1, 4 * mm)]


def _pairs_table(rows: Sequence[tuple[str, str]], styles: Mapping[str, ParagraphStyle], width: float) -> Table:
    """Label/value pairs in two columns of pairs: compact identification blocks."""
    cells = [[Paragraph(_text(label), styles["label"]), Paragraph(value, styles["body"])] for label, value in rows]
    half = (len(cells) + 1) // 2
    left, right = cells[:half], cells[half:] + [["", ""]] * (half - len(cells[half:]))
    data = [a + b for a, b in zip(left, right)]
    table = Table(data, colWidths=[width * 0.2, width * 0.3, width * 0.2, width * 0.3])
    table.setStyle(TableStyle([
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("LEFTPADDING", (0, 0), (-1, -1), 0),
        ("TOPPADDING", (0, 0), (-1, -1), 0.6 * mm),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 0.6 * mm),
    ]))
    return table




def _identification(strings: Mapping[str, Any], source: pydicom.Dataset, volume: Volume,
                    styles: Mapping[str, ParagraphStyle], missing: str) -> list[Flowable]:
    """Patient, study and the series analysed, from the source instances."""
    date_format = strings["date_format"]
    sex = str(source.get("PatientSex", "") or "").strip().upper()
    sex_text = strings.get("sex_values", {}).get(sex, sex) if sex else missing

    def value(keyword: str) -> str:
        text = str(source.get(keyword, "") or "").strip()
        return _text(text) if text else escape(missing)

    patient = [
        (strings["patient_name"], _text(_person_name(source.get("PatientName"), missing))),
        (strings["patient_id"], value("PatientID")),
        (strings["birth_date"], _text(_dicom_date(source.get("PatientBirthDate"), date_format, missing))),
        (strings["sex"], _text(sex_text)),
    ]
    study = [
        (strings["study_date"], _text(_dicom_date(source.get("StudyDate"), date_format, missing))),
        (strings["accession_number"], value("AccessionNumber")),
        (strings["study_description"], value("StudyDescription")),
    ]
    decimal = strings["decimal_separator"]
    slice_mm, row_mm, column_mm = volume.spacing
    voxel = strings["voxel_size_value"].format(
        row=_number(row_mm, 2, decimal, missing), column=_number(column_mm, 2, decimal, missing),
        slice=_number(slice_mm, 2, decimal, missing),
    )
    series = [
        (strings["series_description"], _text(volume.series_description) if volume.series_description.strip()
         else escape(missing)),
        (strings["modality"], _text(volume.modality) if volume.modality else escape(missing)),
        (strings["series_number"], value("SeriesNumber")),
        (strings["images"], str(len(volume.frames))),
        (strings["voxel_size"], _text(voxel)),
        (strings["series_uid"], f'<font size="7">{_text(volume.series_instance_uid)}</font>'),
    ]
    return [
        Paragraph(_text(strings["patient"]), styles["section"]), _pairs_table(patient, styles, _FRAME_WIDTH),
        Paragraph(_text(strings["study"]), styles["section"]), _pairs_table(study, styles, _FRAME_WIDTH),
        Paragraph(_text(strings["series_analysed"]), styles["section"]), _pairs_table(series, styles, _FRAME_WIDTH),
    ]


def _model_section(strings: Mapping[str, Any], model: ModelInfo,
                   styles: Mapping[str, ParagraphStyle]) -> list[Flowable]:
    """Which model, what it was trained on and how good it is, in the model's own words."""
    not_stated = f'<i>{escape(strings["not_stated"])}</i>'

    def stated(text: str) -> str:
        return _text(text) if text.strip() else not_stated

    rows = [
        (strings["model_name"], stated(model.name)),
        (strings["model_version"], stated(model.version)),
        (strings["model_id"], stated(model.id)),
        (strings["model_description"], stated(model.description)),
        (strings["trained_on"], stated(model.trained_on)),
        (strings["accuracy"], stated(model.accuracy)),
    ]
    cells = [[Paragraph(_text(label), styles["label"]), Paragraph(value, styles["body"])] for label, value in rows]
    table = Table(cells, colWidths=[_FRAME_WIDTH * 0.22, _FRAME_WIDTH * 0.78])
    table.setStyle(TableStyle([
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("LEFTPADDING", (0, 0), (-1, -1), 0),
        ("TOPPADDING", (0, 0), (-1, -1), 0.6 * mm),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 0.6 * mm),
    ]))
    story: list[Flowable] = [Paragraph(_text(strings["model"]), styles["section"]), table]
    if model.demonstration:
        story += [Spacer(1, 1.5 * mm), Paragraph(_text(strings["demonstration_text"]), styles["warning"])]
    return story


def _grid(data: list[list[Any]], widths: Sequence[float], palette: Mapping[str, colors.Color]) -> Table:
    table = Table(data, colWidths=list(widths), repeatRows=1)
    table.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, 0), palette["header_background"]),
        ("GRID", (0, 0), (-1, -1), 0.4, palette["grid"]),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("TOPPADDING", (0, 0), (-1, -1), 1.2 * mm),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 1.2 * mm),
    ]))
    return table


def _findings_section(strings: Mapping[str, Any], findings: Sequence[Finding], styles: Mapping[str, ParagraphStyle],
                      palette: Mapping[str, colors.Color], missing: str) -> list[Flowable]:
    """One row per finding (volume 2 decimals, diameters 1 decimal), or the no-finding statement."""
    story: list[Flowable] = [Paragraph(_text(strings["findings"]), styles["section"])]
    if not findings:
        story.append(Paragraph(_text(strings["no_finding"]), styles["body"]))
        return story
    decimal = strings["decimal_separator"]
    head = [Paragraph(_text(strings[key]), styles["head" if i < 2 else "head_right"]) for i, key in enumerate(
        ("lesion", "location", "volume_ml", "max_3d_diameter", "longest_axial_diameter", "perpendicular_axial_diameter")
    )]
    data: list[list[Any]] = [head]
    for finding in sorted(findings, key=lambda f: f.number):
        lesion = _text(finding.tracking_id or f"{strings['lesion']} {finding.number}")
        if finding.segment_name:
            muted = palette["muted"].hexval()[2:]
            lesion += f'<br/><font size="7" color="#{muted}">{_text(finding.segment_name)}</font>'
        data.append([
            Paragraph(lesion, styles["cell"]),
            Paragraph(_text(finding.location) if finding.location.strip() else escape(missing), styles["cell"]),
            Paragraph(_number(finding.volume_ml, 2, decimal, missing), styles["cell_right"]),
            Paragraph(_number(finding.max_3d_diameter_mm, 1, decimal, missing), styles["cell_right"]),
            Paragraph(_number(finding.longest_axial_diameter_mm, 1, decimal, missing), styles["cell_right"]),
            Paragraph(_number(finding.perpendicular_axial_diameter_mm, 1, decimal, missing), styles["cell_right"]),
        ])
    widths = [w * _FRAME_WIDTH for w in (0.20, 0.20, 0.13, 0.15, 0.16, 0.16)]
    story.append(_grid(data, widths, palette))
    return story


def _comparison_section(strings: Mapping[str, Any], comparison: Sequence[Mapping[str, Any]], response: str | None,
                        styles: Mapping[str, ParagraphStyle], palette: Mapping[str, colors.Color],
                        missing: str) -> list[Flowable]:
    """Prior versus current volume per tracked lesion, and the overall response line."""
    story: list[Flowable] = [Paragraph(_text(strings["comparison"]), styles["section"])]
    decimal = strings["decimal_separator"]
    statuses = strings.get("status_values", {})
    if comparison:
        head = [Paragraph(_text(strings[key]), styles["head" if i in (0, 6) else "head_right"]) for i, key in enumerate(
            ("lesion", "prior_volume_ml", "current_volume_ml", "change_percent", "prior_longest_mm",
             "current_longest_mm", "status")
        )]
        data: list[list[Any]] = [head]
        for item in comparison:
            status = str(item.get("status") or "")
            data.append([
                Paragraph(_text(item.get("tracking_id") or missing), styles["cell"]),
                Paragraph(_number(item.get("prior_volume_ml"), 2, decimal, missing), styles["cell_right"]),
                Paragraph(_number(item.get("current_volume_ml"), 2, decimal, missing), styles["cell_right"]),
                Paragraph(_number(item.get("change_percent"), 1, decimal, missing, signed=True), styles["cell_right"]),
                Paragraph(_number(item.get("prior_longest_diameter_mm"), 1, decimal, missing), styles["cell_right"]),
                Paragraph(_number(item.get("current_longest_diameter_mm"), 1, decimal, missing), styles["cell_right"]),
                Paragraph(_text(statuses.get(status.lower(), status) or missing), styles["cell"]),
            ])
        story.append(_grid(data, [w * _FRAME_WIDTH for w in (0.17, 0.13, 0.13, 0.12, 0.13, 0.13, 0.19)], palette))
    if response:
        story += [Spacer(1, 2 * mm),
                  Paragraph(f"<b>{_text(strings['response'])}:</b> {_text(response)}", styles["body"])]
    return story


def _key_images_section(strings: Mapping[str, Any], volume: Volume, labels: np.ndarray, findings: Sequence[Finding],
                        model: ModelInfo, styles: Mapping[str, ParagraphStyle], max_key_images: int) -> list[Flowable]:
    """The key slices of the largest findings, two per row, with a caption naming the source image."""
    chosen = sorted(findings, key=lambda f: (-f.volume_ml, f.number))[: max(0, max_key_images)]
    if not chosen:
        return []
    instance_numbers = {str(ds.SOPInstanceUID): ds.get("InstanceNumber") for ds in volume.datasets}
    series_number = volume.datasets[0].get("SeriesNumber", "") if volume.datasets else ""
    cell_width = _FRAME_WIDTH / 2 - 4 * mm
    cells: list[list[Flowable]] = []
    for finding in chosen:
        png = render_key_image(volume, labels, finding, model)
        with PILImage.open(io.BytesIO(png)) as image:
            aspect = image.height / image.width
        width = min(cell_width, 85 * mm / aspect)
        frame = volume.frames[finding.key_slice]
        instance = instance_numbers.get(frame.sop_instance_uid)
        image_text = str(instance) if instance not in (None, "") else str(finding.key_slice + 1)
        key = "key_image_caption" if frame.frame_number is None else "key_image_frame_caption"
        caption = strings[key].format(
            lesion=finding.tracking_id or f"{strings['lesion']} {finding.number}",
            segment=finding.segment_name or strings["missing"],
            image=image_text, frame=frame.frame_number, series=series_number or strings["missing"],
        )
        cells.append([Image(io.BytesIO(png), width=width, height=width * aspect), Spacer(1, 1 * mm),
                      Paragraph(_text(caption), styles["caption"])])
    rows = [cells[i : i + 2] + [[]] * (2 - len(cells[i : i + 2])) for i in range(0, len(cells), 2)]
    table = Table(rows, colWidths=[_FRAME_WIDTH / 2] * 2)
    table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("ALIGN", (0, 0), (-1, -1), "CENTER")]))
    return [KeepTogether([Paragraph(_text(strings["key_images"]), styles["section"]), table])]


# --- DICOM --------------------------------------------------------------------------------------

# Patient, Patient Study and General Study attributes copied from the source so the report files with its study.
_COPIED_FROM_SOURCE = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientBirthDate",
    "PatientSex", "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription",
)
# Type 2 attributes of those modules: present, empty when the source lacks them.
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
           "ReferringPhysicianName", "StudyID", "AccessionNumber")


def write_pdf_report(
    volume: Volume,
    labels: np.ndarray,
    findings: Sequence[Finding],
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9004,
    language: str | None = None,
    template_dir: Path | None = None,
    comparison: Sequence[Mapping[str, Any]] | None = None,
    response: str | None = None,
    generated_at: datetime | None = None,
) -> pydicom.Dataset:
    """The report as an Encapsulated PDF Storage instance in a new series of the source study.

    Patient and study attributes are copied from the source; Source Instance Sequence lists every source
    image; Verification Flag is UNVERIFIED (a clinician has not signed it). The document is padded to an
    even length with one NUL byte, Encapsulated Document Length giving its true length (PS3.3 C.24.2).
    """
    generated_at = generated_at or datetime.now().astimezone()
    template = _load_template(template_dir, language)
    pdf = render_report_pdf(volume, labels, findings, model, language=template.language, template_dir=template_dir,
                            comparison=comparison, response=response, generated_at=generated_at)
    source = volume.datasets[0] if volume.datasets else pydicom.Dataset()

    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: translated titles and any patient name, whatever the source
    for keyword in _COPIED_FROM_SOURCE:
        if keyword in source:
            ds[keyword] = source[keyword]
    for keyword in _TYPE_2:
        if keyword not in ds:
            setattr(ds, keyword, "")

    date, time = generated_at.strftime("%Y%m%d"), generated_at.strftime("%H%M%S")
    # SOP Common
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = _series_description(f"{model.name} report", demonstration=model.demonstration)
    # General Equipment and SC Equipment: the software is the device
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = _lo(model.id)
    ds.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    ds.SoftwareVersions = [_lo(f"{model.id} {model.version}"), _lo(f"orthanc-ai {__version__}")]
    institution = str(template.settings.get("institution_name") or "")
    if institution:
        ds.InstitutionName = _lo(institution)
    ds.ConversionType = "WSD"
    ds.ContributingEquipmentSequence = [_contributing_equipment(model, generated_at)]
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = generated_at.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the pages carry the patient's name and ID
    ds.DocumentTitle = _lo(f"{template.strings['title']} — {model.name}", 64)
    concept = pydicom.Dataset()
    concept.CodeValue = REPORT_CONCEPT.value
    concept.CodingSchemeDesignator = REPORT_CONCEPT.scheme_designator
    concept.CodeMeaning = REPORT_CONCEPT.meaning
    ds.ConceptNameCodeSequence = [concept]
    ds.VerificationFlag = "UNVERIFIED"
    ds.SourceInstanceSequence = [_reference(ds_source) for ds_source in volume.datasets]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + b"\x00" * (len(pdf) % 2)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds


def _reference(source: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def _contributing_equipment(model: ModelInfo, generated_at: datetime) -> pydicom.Dataset:
    """(109102, DCM, "Processing Equipment") naming the model, as the SEG writer does."""
    purpose = pydicom.Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = "109102", "DCM", "Processing Equipment"
    item = pydicom.Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = _lo(model.id)
    item.SoftwareVersions = _lo(model.version)
    item.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    item.ContributionDateTime = generated_at.strftime("%Y%m%d%H%M%S")
    parts = [f"Report by {model.name} {model.version} ({model.id})."]
    if model.demonstration:
        parts.append("Demonstration model, not for diagnosis.")
    item.ContributionDescription = " ".join(parts)[:1024]
    return item


def _lo(text: str, length: int = 64) -> str:
    """A value fit for LO: one line, at most ``length`` characters."""
    return " ".join(str(text).split())[:length]
