"""Vendor slide files (SVS, NDPI, TIFF…) as a DICOM VL Whole Slide Microscopy Image series, so that OHIF's
microscopy mode (and any DICOM WSI viewer) can show them.

The conversion is done by ``OrthancWSIDicomizer`` from Debian's ``orthanc-wsi`` package (AGPL-3, run as a
separate program, never linked): JPEG tiles are transcoded, not re-encoded, so level 0 keeps the scanner's
pixels. It writes into a local folder; :func:`complete_instances` then adds what its output lacks for
``dciodvfy`` (the WSI frame type of each level, a SNOMED CT code instead of a retired SNOMED RT one), and the
worker stores the files in Orthanc itself (no Orthanc password on a command line). Patient and study come
from the same :class:`~inference.pathology.dicom.StudyContext` as the slide's results, so the image and the
results share one study; the series UID derives from the slide, so converting again replaces the series.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pydicom
from pydicom.dataset import Dataset

from inference import __version__
from inference.pathology.dicom import StudyContext
from inference.pathology.reader import SlideError
from inference.results.identity import DEVICE_SERIAL_NUMBER, MANUFACTURER, derived_uid

__all__ = ["DicomizerCancelled", "DicomizerFailed", "DicomizerMissing", "WsiSeries", "WsiTarget",
           "complete_instances", "dicomize", "find_dicomizer", "wsi_dataset"]

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
DICOMIZER = "OrthancWSIDicomizer"
#: Where to find the program when it is not on PATH (a path to the executable).
DICOMIZER_ENV = "ORTHANC_AI_DICOMIZER"
#: A single-level source larger than this (pixels on its long side) gets a pyramid built, else viewers
#: would have to fetch every full-resolution tile to show an overview.
PYRAMID_ABOVE_PX = 4096
ORIGINAL_TYPE = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
RESAMPLED_TYPE = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
#: SNOMED RT "Full Spectrum" (retired scheme SRT, which orthanc-wsi 1.1 writes) and its SNOMED CT code.
_FULL_SPECTRUM = {"R-102C0": "414298005"}


class DicomizerMissing(SlideError):
    """OrthancWSIDicomizer is not installed where the worker runs."""


class DicomizerFailed(SlideError):
    """OrthancWSIDicomizer ran and failed (the message ends with the tail of its log)."""


class DicomizerCancelled(Exception):
    """The conversion was stopped because its slide was deleted or reassigned."""


@dataclass(frozen=True)
class WsiTarget:
    """What the converted series is: its study, its identity and the slide's physical size."""

    study: StudyContext
    series_instance_uid: str
    container_identifier: str
    specimen_uid: str
    width_px: int
    height_px: int
    mpp_x: float
    mpp_y: float
    series_description: str = "Whole slide image (converted)"

    @classmethod
    def for_slide(cls, study: StudyContext, slide_key: str, *, container_identifier: str, width_px: int,
                  height_px: int, mpp_x: float, mpp_y: float | None = None) -> "WsiTarget":
        """UIDs derived from the slide (``slide_key``): the same specimen as the slide's results, and one
        series per slide, replaced when converted again."""
        return cls(study=study, series_instance_uid=derived_uid("slide", slide_key, "WSI", "series"),
                   container_identifier=_lo(container_identifier), specimen_uid=derived_uid("specimen", slide_key),
                   width_px=int(width_px), height_px=int(height_px), mpp_x=float(mpp_x),
                   mpp_y=float(mpp_y or mpp_x))


@dataclass
class WsiSeries:
    """The converted series, written in ``folder`` and completed by :func:`complete_instances`."""

    study_instance_uid: str
    series_instance_uid: str
    files: list[Path]
    sop_instance_uids: list[str]
    levels: list[tuple[int, int]]  # (columns, rows) of each pyramid level, largest first
    timings: dict[str, float] = field(default_factory=dict)
    dicomizer_version: str = ""


def _lo(text: str) -> str:
    return " ".join(str(text).split())[:64]


def find_dicomizer() -> str:
    """The OrthancWSIDicomizer executable (``$ORTHANC_AI_DICOMIZER`` or PATH)."""
    override = os.environ.get(DICOMIZER_ENV)
    if override:
        if os.access(override, os.X_OK):
            return override
        raise DicomizerMissing(f"{DICOMIZER_ENV} names {override}, which is not an executable file")
    found = shutil.which(DICOMIZER)
    if not found:
        raise DicomizerMissing(f"{DICOMIZER} is not installed on this worker: install the Debian package "
                               f"orthanc-wsi (apt-get install orthanc-wsi), or set {DICOMIZER_ENV}")
    return found


def openslide_library() -> str | None:
    """The OpenSlide library bundled with openslide-bin, for the formats that are not tiled TIFF (NDPI, MRXS…)."""
    try:
        import openslide_bin
    except ImportError:
        return None
    folder = Path(openslide_bin.__file__).parent
    libraries = sorted(folder.glob("libopenslide.so*")) + sorted(folder.glob("libopenslide*.dylib"))
    return str(libraries[0]) if libraries else None


def wsi_dataset(target: WsiTarget, dicomizer_version: str = "") -> dict:
    """The ``--dataset`` JSON: patient, study, equipment and specimen attributes (all type 1/2 attributes
    that OrthancWSIDicomizer 1.1 leaves out)."""
    s = target.study
    versions = [v for v in (f"{DICOMIZER} {dicomizer_version}".strip(), f"orthanc-ai {__version__}") if v]
    ds = {
        "PatientID": s.patient_id, "PatientName": s.patient_name, "PatientBirthDate": s.patient_birth_date,
        "PatientSex": s.patient_sex, "StudyInstanceUID": s.study_instance_uid, "StudyID": s.study_id,
        "StudyDate": s.study_date, "StudyTime": s.study_time, "AccessionNumber": s.accession_number,
        "ReferringPhysicianName": s.referring_physician_name,
        "SeriesInstanceUID": target.series_instance_uid, "SeriesNumber": "1",
        "SeriesDescription": _lo(target.series_description),
        "Manufacturer": MANUFACTURER, "ManufacturerModelName": DICOMIZER, "DeviceSerialNumber": DEVICE_SERIAL_NUMBER,
        "SoftwareVersions": "\\".join(_lo(v) for v in versions),
        "ImageType": "\\".join(ORIGINAL_TYPE), "FocusMethod": "AUTO", "ExtendedDepthOfField": "NO",
        "AcquisitionContextSequence": [],
        "ContainerIdentifier": target.container_identifier, "IssuerOfTheContainerIdentifierSequence": [],
        "ContainerTypeCodeSequence": [],
        "SpecimenDescriptionSequence": [{
            "SpecimenIdentifier": target.container_identifier, "SpecimenUID": target.specimen_uid,
            "IssuerOfTheSpecimenIdentifierSequence": [], "SpecimenPreparationSequence": []}],
        "SpecimenLabelInImage": "NO", "BurnedInAnnotation": "NO",
    }
    if s.study_description:
        ds["StudyDescription"] = _lo(s.study_description)
    if not s.study_date:  # OrthancWSIDicomizer fills in today
        del ds["StudyDate"], ds["StudyTime"]
    return ds


def dicomizer_command(executable: str, source: Path, folder: Path, dataset: Path, target: WsiTarget, *,
                      levels: int, threads: int, openslide: str | None) -> list[str]:
    """The command line, with the physical size from the slide's pixel size.

    OrthancWSIDicomizer lays the image's columns along the slide's Y axis (Image Orientation (Slide)
    ``0\\-1\\0\\-1\\0\\0``), so the imaged width (slide X) spans the image's rows, and Pixel Spacing
    comes out as (imaged width / rows, imaged height / columns).
    """
    cmd = [executable, "--folder", str(folder), "--dataset", str(dataset), "--threads", str(max(1, threads)),
           "--imaged-width", f"{target.height_px * target.mpp_y / 1000:.6f}",
           "--imaged-height", f"{target.width_px * target.mpp_x / 1000:.6f}"]
    if levels <= 1 and max(target.width_px, target.height_px) > PYRAMID_ABOVE_PX:
        cmd += ["--pyramid", "1"]
    if openslide:
        cmd += ["--openslide", openslide]
    return cmd + [str(source)]


def dicomize(source: Path, folder: Path, target: WsiTarget, *, levels: int = 1, threads: int = 2,
             progress: Callable[[float, str], None] | None = None, cancelled: Callable[[], bool] | None = None,
             executable: str | None = None) -> WsiSeries:
    """Convert ``source`` into DICOM files under ``folder`` and complete them; raises :class:`DicomizerMissing`
    or :class:`DicomizerFailed` (with the tail of the program's log, patient values redacted)."""
    exe = executable or find_dicomizer()
    report = progress or (lambda f, m: None)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.dcm"):
        old.unlink()
    version = dicomizer_version(exe)
    dataset = folder.parent / "wsi-dataset.json"
    dataset.write_text(json.dumps(wsi_dataset(target, version)))
    cmd = dicomizer_command(exe, source, folder, dataset, target, levels=levels, threads=threads,
                            openslide=openslide_library())
    t = time.perf_counter()
    tail = _run(cmd, report, cancelled)
    seconds = round(time.perf_counter() - t, 3)
    files = sorted(folder.glob("*.dcm"))
    if tail is not None:
        raise DicomizerFailed(f"{DICOMIZER} could not convert the slide: {_redact(tail, target.study)}")
    if not files:
        raise DicomizerFailed(f"{DICOMIZER} wrote no DICOM file")
    t2 = time.perf_counter()
    report(0.9, "completing the DICOM attributes")
    series = complete_instances(files)
    series.timings = {"dicomize": seconds, "complete": round(time.perf_counter() - t2, 3)}
    series.dicomizer_version = version
    if series.series_instance_uid != target.series_instance_uid or \
            series.study_instance_uid != target.study.study_instance_uid:
        raise DicomizerFailed(f"{DICOMIZER} did not keep the requested study and series UIDs")
    return series


def _run(cmd: list[str], report: Callable[[float, str], None], cancelled: Callable[[], bool] | None) -> str | None:
    """Run the program; None on success, else the tail of its log (errors first)."""
    lines: deque[str] = deque(maxlen=40)
    stopped: list[bool] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace")
    except OSError as exc:
        raise DicomizerMissing(f"{DICOMIZER} could not be started: {exc}") from exc

    def read() -> None:
        for line in proc.stdout:
            line = line.rstrip()
            lines.append(line)
            if "Progress:" in line and not stopped:
                try:
                    pct = float(line.rsplit("Progress:", 1)[1].strip().rstrip("%"))
                    report(0.85 * pct / 100, f"converting to DICOM ({pct:.0f} %)")
                except ValueError:
                    pass
                except Exception:  # the slide was cancelled: the loop below stops the program
                    stopped.append(True)

    reader = threading.Thread(target=read, name="dicomizer-log", daemon=True)
    reader.start()
    while proc.poll() is None:
        if cancelled is not None and cancelled():
            proc.kill()
            proc.wait()
            reader.join(timeout=5)
            raise DicomizerCancelled("the slide was deleted or reassigned while it was converted")
        time.sleep(0.2)
    reader.join(timeout=10)
    log = list(lines)
    errors = [line for line in log if line[:1] in ("E", "F")]
    # OrthancWSIDicomizer 1.1 exits 0 after some failures ("Terminating on exception"): trust its log too
    if proc.returncode == 0 and not any("Terminating on exception" in line for line in errors):
        return None
    shown = errors or log
    text = " | ".join(_strip_glog(line) for line in shown[-6:])
    return f"{text[-900:]} (exit status {proc.returncode})"


def _strip_glog(line: str) -> str:
    """``E1122 01:47:22.548712 Dicomizer.cpp:1122] message`` → ``message``."""
    return line.split("] ", 1)[1] if "] " in line[:60] else line


def _redact(text: str, study: StudyContext) -> str:
    for value in (study.patient_id, study.patient_name, study.accession_number, study.study_description):
        if value and len(value) >= 3:
            text = text.replace(value, "***")
    return text


def dicomizer_version(executable: str) -> str:
    try:
        out = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in (out.stdout + out.stderr).splitlines():
        if "Orthanc WSI version:" in line:
            return line.rsplit(":", 1)[1].strip()
        if line.startswith(DICOMIZER) and " " in line.strip():
            return line.strip().split()[-1]
    return ""


def complete_instances(files: list[Path]) -> WsiSeries:
    """Add what OrthancWSIDicomizer 1.1 leaves out, in place: the WSI frame type (Shared Functional Groups,
    type 1) and the image type of each level (``ORIGINAL``/``NONE`` for the largest, ``DERIVED``/
    ``RESAMPLED`` below), the SNOMED CT code of the illumination colour, and the Frame of Reference."""
    datasets = []
    for path in files:
        ds = pydicom.dcmread(path)
        if str(ds.SOPClassUID) != WSI_SOP_CLASS:
            raise DicomizerFailed(f"{DICOMIZER} wrote a {ds.SOPClassUID} instance, not a VL WSI image")
        datasets.append((path, ds))
    sizes = sorted({(int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)) for _, ds in datasets},
                   reverse=True)
    series_uids = {str(ds.SeriesInstanceUID) for _, ds in datasets}
    studies = {str(ds.StudyInstanceUID) for _, ds in datasets}
    if len(series_uids) != 1 or len(studies) != 1:
        raise DicomizerFailed(f"{DICOMIZER} wrote {len(series_uids)} series in {len(studies)} studies, not one")
    uids = []
    series_uid = next(iter(series_uids))
    # the Frame of Reference module (mandatory in the VL WSI IOD; bulk annotations reference it): one frame for
    # every level of the slide, derived from the series (a re-conversion keeps it)
    frame_of_reference = pydicom.uid.generate_uid(entropy_srcs=[series_uid, "frame of reference"])
    for path, ds in datasets:
        if "FrameOfReferenceUID" not in ds:
            ds.FrameOfReferenceUID = frame_of_reference
        if "PositionReferenceIndicator" not in ds:
            ds.PositionReferenceIndicator = "SLIDE_CORNER"
        size = (int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows))
        image_type = ORIGINAL_TYPE if size == sizes[0] else RESAMPLED_TYPE
        ds.ImageType = image_type
        shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
        if shared is None:
            shared = Dataset()
            ds.SharedFunctionalGroupsSequence = [shared]
        frame_type = Dataset()
        frame_type.FrameType = image_type
        shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
        for path_item in ds.get("OpticalPathSequence", []):
            for code in path_item.get("IlluminationColorCodeSequence", []):
                if code.get("CodingSchemeDesignator") == "SRT" and code.get("CodeValue") in _FULL_SPECTRUM:
                    code.CodeValue = _FULL_SPECTRUM[code.CodeValue]
                    code.CodingSchemeDesignator = "SCT"
        if "Laterality" in ds and not ds.Laterality:
            del ds.Laterality  # type 2C, and a slide has no laterality
        ds.save_as(path, enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return WsiSeries(study_instance_uid=studies.pop(), series_instance_uid=series_uids.pop(), files=list(files),
                     sop_instance_uids=uids, levels=sizes)
