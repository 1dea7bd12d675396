"""The slide-job side of the worker: claim a slide stage from the plugin, run it, report it.

Called by the worker loop (``inference/__main__.py``) when no radiology job is waiting. Like the rest of
the worker it holds no state: the slide's file is fetched from the plugin in chunks (or its DICOM
instances from Orthanc) into a local temporary folder, which is reused by the next stage of the same
slide and deleted afterwards; nothing assumes a disk shared with Orthanc. A lost lease or a deleted
slide stops the work without reporting.

A third kind of claim, ``dicom``, converts a vendor file to a DICOM WSI series (``dicomize.py``) in the
study of the slide's results, and stores it in Orthanc; the slide's own state and results are untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
import numpy as np

from inference.client import OrthancClient, OrthancUnavailable
from inference.heartbeat import LeaseHeartbeat
from inference.pathology import dicom as D
from inference.pathology.dicomize import DICOMIZER, DicomizerCancelled, WsiTarget, dicomize
from inference.pathology.geojson import read_geojson_into, write_geojson
from inference.pathology.pipeline import SlideSettings, run_analysis_stage, run_qc_stage
from inference.pathology.qc import tiles_from_state
from inference.pathology.reader import SlideError, open_slide
from inference.pathology.report import build_report, validate_report
from inference.pathology.store import NucleusStore

log = logging.getLogger("inference.pathology.worker")

__all__ = ["SlideCancelled", "SlideWorker"]

CHUNK = 32 * 1024 * 1024


class SlideCancelled(Exception):
    """The slide was deleted or its lease lost while it ran."""


class _Heartbeat(LeaseHeartbeat):
    """The slide stage's lease; progress reports stop the stage once the slide is deleted or reassigned."""

    def __init__(self, client: OrthancClient, slide_id: str, lease: str, interval: float,
                 path: str = "heartbeat") -> None:
        super().__init__(client, f"/ai/slides/{slide_id}/{path}", lease, interval, name="slide-heartbeat")
        self.slide_id = slide_id
        self.lost = self.cancel

    def report(self, progress: float, message: str) -> None:
        if self.lost.is_set():
            raise SlideCancelled(f"slide {self.slide_id} was deleted or reassigned")
        super().report(progress, message)


class SlideWorker:
    """Claims and runs slide stages (``qc`` then ``analysis``) for one worker process."""

    def __init__(self, client: OrthancClient, worker_id: str, workdir: Path | None = None) -> None:
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from our block threads, not from inside each call
        self.client, self.worker_id = client, worker_id
        self.root = Path(workdir or tempfile.gettempdir()) / f"orthanc-ai-slides-{os.getpid()}"
        self._cached: str | None = None  # slide id whose source is in self.root
        self._sha256: str | None = None  # of the local copy (for DICOM: of its instances' digests)

    def poll(self) -> bool:
        """Claim and run one slide stage; False when there is none (or slides are unavailable)."""
        try:
            r = self.client.post_json("/ai/slides/worker/claim", {"worker": self.worker_id})
        except OrthancUnavailable:
            return False
        if r.status_code != 200:
            return False
        self.process(r.json())
        return True

    # -- one claimed stage -----------------------------------------------------------------------------
    def process(self, claimed: dict) -> None:
        slide, lease, stage = claimed["slide"], claimed["lease"], claimed["stage"]
        slide_id = slide["id"]
        settings = SlideSettings.from_json(claimed.get("settings"))
        interval = max(1.0, float(claimed.get("lease_seconds", 30)) / 3)
        prefix = "dicom/" if stage == "dicom" else ""  # the conversion reports on its own routes
        log.info("slide %s: %s stage (attempt %s)", slide_id, stage,
                 (slide.get("dicom") or {}).get("attempts") if prefix else slide.get("attempts"))
        with _Heartbeat(self.client, slide_id, lease, interval, f"{prefix}heartbeat") as hb:
            try:
                source = self._fetch(slide, hb)
                if stage == "qc":
                    path, body = "qc-complete", self._qc(slide, source, settings, lease, claimed, hb)
                elif stage == "dicom":
                    path, body = "dicom/complete", self._convert(slide, source, settings, hb)
                else:
                    path, body = "complete", self._analysis(slide, source, settings, lease, claimed, hb)
            except (SlideCancelled, DicomizerCancelled) as exc:
                log.warning("slide %s stopped: %s", slide_id, exc)
                self._forget()
                return
            except SlideError as exc:
                path, body = f"{prefix}fail", {"error": str(exc), "retryable": False}
            except OrthancUnavailable as exc:
                path, body = f"{prefix}fail", {"error": str(exc), "retryable": True}
            except Exception as exc:  # a bug: fail visibly, keep the worker alive
                log.exception("slide %s failed", slide_id)
                path, body = f"{prefix}fail", {"error": f"{type(exc).__name__}: {exc}", "retryable": False}
        if path.endswith("fail") or (path == "qc-complete" and body.get("outcome") != "pass") \
                or path.endswith("complete") and path != "qc-complete":
            self._forget()
        self._post(slide_id, path, {"lease": lease, "worker": self.worker_id, **body})

    def _post(self, slide_id: str, path: str, body: dict) -> None:
        for attempt in range(10):
            try:
                r = self.client.post_json(f"/ai/slides/{slide_id}/{path}", body)
                if r.status_code >= 400:
                    log.warning("slide %s: %s refused (%s)", slide_id, path, r.text[:300])
                return
            except OrthancUnavailable as exc:
                log.warning("could not report slide %s (%s); retrying", slide_id, exc)
                time.sleep(min(2 ** attempt, 10))

    def _upload(self, slide_id: str, name: str, data: bytes, lease: str) -> None:
        r = self.client._request("POST", f"/ai/slides/{slide_id}/artifacts/{name}", data=data,
                                 headers={"Content-Type": "application/octet-stream", "X-Slide-Lease": lease})
        if r.status_code == 409:
            raise SlideCancelled(f"slide {slide_id} was reassigned")
        r.raise_for_status()

    # -- the source, local -------------------------------------------------------------------------------
    def _forget(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._cached = self._sha256 = None

    def _fetch(self, slide: dict, hb: _Heartbeat) -> Path:
        """A local copy of the slide (a file, or a folder of DICOM instances), reused between stages."""
        folder = self.root / "source"
        if self._cached == slide["id"] and folder.exists():
            return self._entry(folder, slide)
        self._forget()
        folder.mkdir(parents=True)
        self._cached = slide["id"]
        hb.report(0.0, "fetching the slide")
        if slide["source"]["kind"] == "dicom":
            ids = self.client.series_instance_ids(slide["orthanc_series_id"])
            digests = []
            for i, instance in enumerate(ids):
                digests.append(self._download(f"/instances/{instance}/file", folder / f"{i:05d}.dcm"))
                hb.report(0.0, f"fetching instance {i + 1}/{len(ids)}")
            self._sha256 = hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()
        else:
            digest = hashlib.sha256()
            target = folder / "slide"
            with open(target, "wb") as f:
                offset = 0
                while True:
                    r = self.client._request("GET", f"/ai/slides/{slide['id']}/source",
                                             params={"offset": offset, "length": CHUNK})
                    if r.status_code == 404:
                        raise SlideCancelled("the slide's file is gone")
                    r.raise_for_status()
                    if not r.content:
                        break
                    f.write(r.content)
                    digest.update(r.content)
                    offset += len(r.content)
                    hb.report(0.0, f"fetching the slide ({offset // (1 << 20)} MB)")
                    if len(r.content) < CHUNK:
                        break
            expected = slide["source"].get("sha256")
            if expected and digest.hexdigest() != expected:
                raise OrthancUnavailable(f"the slide arrived damaged (SHA-256 {digest.hexdigest()[:12]}… "
                                         f"instead of {expected[:12]}…)")
            self._sha256 = digest.hexdigest()
        return self._entry(folder, slide)

    @staticmethod
    def _entry(folder: Path, slide: dict) -> Path:
        return folder if slide["source"]["kind"] == "dicom" else folder / "slide"

    def _download(self, uri: str, target: Path) -> str:
        """Stream ``uri`` into ``target``; returns its SHA-256."""
        digest = hashlib.sha256()
        try:
            # uncompressed: gzipping a slide's JPEG frames costs Orthanc CPU and gains nothing
            with self.client.session.get(self.client.url + uri, stream=True, timeout=self.client.timeout,
                                         headers={"Accept-Encoding": "identity"}) as r:
                if r.status_code >= 500:
                    raise OrthancUnavailable(f"Orthanc answered {r.status_code} to GET {uri}")
                r.raise_for_status()
                with open(target, "wb") as f:
                    for chunk in r.iter_content(1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
        except OSError as exc:
            raise OrthancUnavailable(f"could not fetch {uri}: {exc}") from exc
        return digest.hexdigest()

    # -- stages --------------------------------------------------------------------------------------------
    def _qc(self, slide: dict, source: Path, settings: SlideSettings, lease: str, claimed: dict,
            hb: _Heartbeat) -> dict:
        with open_slide(source) as wsi:
            outcome = run_qc_stage(wsi, settings, hb.report)
        from inference.pathology.heatmap import encode_png

        self._upload(slide["id"], "thumbnail.png", encode_png(outcome.thumbnail), lease)
        self._upload(slide["id"], "tissue-mask.png", outcome.mask_png, lease)
        state = outcome.state()
        result = "pass"
        if outcome.error:
            result = "empty" if outcome.slide_qc is not None and outcome.slide_qc.status == "empty" else "fail"
            report = build_report(slide_id=slide["id"], status="skipped" if result == "empty" else "failed",
                                  error=outcome.error, source=self._source_json(slide), qc_state=state, analysis=None,
                                  outputs={"dicom": [], "files": ["thumbnail.png", "tissue-mask.png"]},
                                  parameters=self._parameters(settings, None), worker=self.worker_id)
            validate_report(report)
            self._upload(slide["id"], "report.json", json.dumps(report, indent=1).encode(), lease)
        return {"outcome": result, "error": outcome.error, "metadata": outcome.metadata, "qc_state": state,
                "timings": outcome.timings}

    def _analysis(self, slide: dict, source: Path, settings: SlideSettings, lease: str, claimed: dict,
                  hb: _Heartbeat) -> dict:
        import cv2

        qc_state = claimed.get("qc_state") or {}
        if not qc_state.get("tiles") or not qc_state.get("mpp"):
            raise SlideError("the quality-control results of this slide are missing; re-run it")
        tiles = tiles_from_state(qc_state["tiles"])
        r = self.client._request("GET", f"/ai/slides/{slide['id']}/thumbnail")
        r.raise_for_status()
        thumb = cv2.cvtColor(cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        work = self.root / "work"
        work.mkdir(parents=True, exist_ok=True)
        with open_slide(source) as wsi:
            result = run_analysis_stage(wsi, float(qc_state["mpp"]), tiles, thumb, work, settings, hb.report)
            header = wsi.dicom_header
        timings = dict(result.timings)
        t = time.perf_counter()
        hb.report(0.94, "writing GeoJSON")
        store = NucleusStore.open(result.store_path)
        try:
            slide_key = self._slide_key(slide)
            geo_path = work / "nuclei.geojson.gz"
            geo = write_geojson(store, geo_path, tuple(result.detector["classes"]), slide_key=slide_key)
            timings["geojson"] = round(time.perf_counter() - t, 4)
            analysis = {"figures": result.figures.to_json(), "timings": result.timings, "warnings": result.warnings,
                        "detector": result.detector,
                        "nuclei_tiles": {"core_px": int(result.detector["parameters"].get("core_px", 0)),
                                         "margin_px": int(result.detector["parameters"].get("margin_px", 0)),
                                         "mpp": round(result.nuclei.mpp, 4), "processed": result.nuclei.tiles_processed,
                                         "possible": result.nuclei.tiles_possible}}
            files = ["thumbnail.png", "tissue-mask.png", "heatmap.png", "nuclei.geojson.gz", "report.json"]
            parameters = self._parameters(settings, result.detector)
            report = build_report(slide_id=slide["id"], status="done", error=None, source=self._source_json(slide),
                                  qc_state=qc_state, analysis=analysis,
                                  outputs={"dicom": [], "files": files, "geojson": geo}, parameters=parameters,
                                  worker=self.worker_id)
            dicom_outputs: list[dict] = []
            if (claimed.get("settings") or {}).get("store_dicom_results", True):
                t = time.perf_counter()
                hb.report(0.96, "writing DICOM results")
                datasets = self._dicom(slide, report, result, thumb, header, store, slide_key, qc_state)
                for ds in datasets:
                    self.client.store(ds)
                    dicom_outputs.append({"sop_instance_uid": str(ds.SOPInstanceUID),
                                          "sop_class_uid": str(ds.SOPClassUID),
                                          "series_description": str(ds.get("SeriesDescription", ""))})
                timings["dicom"] = round(time.perf_counter() - t, 4)
            report["outputs"]["dicom"] = dicom_outputs
            report["processing"]["timings_s"].update(timings)
            report["audit"]["stages"] = [{"stage": k, "seconds": v} for k, v in report["processing"]["timings_s"].items()]
            validate_report(report)
            self._upload(slide["id"], "heatmap.png", result.heatmap_png, lease)
            self._upload(slide["id"], "nuclei.geojson.gz", geo_path.read_bytes(), lease)
            self._upload(slide["id"], "report.json", json.dumps(report, indent=1).encode(), lease)
        finally:
            store.close()
        nuclei = report["results"]["nuclei"]
        summary = {"nuclei_total": nuclei["total"], "by_type": nuclei["by_type"],
                   "density_per_mm2": nuclei["density_per_mm2"], "regions_of_interest": len(nuclei["regions_of_interest"]),
                   "model": result.detector["id"], "warnings": report["quality_control"]["warnings"]}
        return {"outputs": [o["sop_instance_uid"] for o in dicom_outputs], "summary": summary, "timings": timings}

    def _dicom(self, slide: dict, report: dict, result, thumb: np.ndarray, header, store: NucleusStore,
               slide_key: str, qc_state: dict) -> list:
        """SR + heatmap SC (+ ANN for DICOM slides), in the slide's study."""
        import cv2

        heat = cv2.cvtColor(cv2.imdecode(np.frombuffer(result.heatmap_png, np.uint8), cv2.IMREAD_COLOR),
                            cv2.COLOR_BGR2RGB)
        meta = qc_state.get("metadata") or {}
        mpp = float(qc_state["mpp"])
        spacing = mpp * (meta.get("width_px") or thumb.shape[1]) / thumb.shape[1] / 1000
        container = slide["source"].get("filename") or slide["id"]
        if header is not None:
            source = D.complete_source(header, container, slide_key)
            sc = D.heatmap_image(heat, slide_key=slide_key, detector=result.detector, source=source, study=None,
                                 container_identifier=container, pixel_spacing_mm=spacing)
            sr = D.slide_report_sr(report, slide_key=slide_key, evidence=[source])
            anns = D.nuclei_annotations(store, source, tuple(result.detector["classes"]), result.detector,
                                        slide_key=slide_key)
            return [sc, sr, *anns]
        study = self._study(slide, slide_key)
        sc = D.heatmap_image(heat, slide_key=slide_key, detector=result.detector, source=None, study=study,
                             container_identifier=container, pixel_spacing_mm=spacing)
        sr = D.slide_report_sr(report, slide_key=slide_key, evidence=[sc])
        return [sc, sr]

    def _convert(self, slide: dict, source: Path, settings: SlideSettings, hb: _Heartbeat) -> dict:
        """The vendor file as a DICOM WSI series in the study of its results (replacing an earlier one)."""
        if slide["source"]["kind"] == "dicom":
            raise SlideError("the slide is already a DICOM WSI series")
        with open_slide(source) as wsi:
            meta = wsi.metadata
        mpp_x = meta.mpp_x or settings.declared_mpp
        if not mpp_x:
            raise SlideError("the slide does not state its pixel size: upload it again with its mpp "
                             "(X-Slide-Mpp) or set AI.Pathology.DefaultMpp")
        slide_key = self._slide_key(slide)
        study = self._study(slide, slide_key)
        target = WsiTarget.for_slide(study, slide_key, container_identifier=slide["source"].get("filename")
                                     or slide["id"], width_px=meta.width, height_px=meta.height, mpp_x=mpp_x,
                                     mpp_y=meta.mpp_y if meta.mpp_x else None)
        folder = self.root / "dicom" / "out"
        series = dicomize(source, folder, target, levels=len(meta.levels), threads=settings.workers,
                          progress=hb.report, cancelled=hb.lost.is_set)
        t = time.perf_counter()
        hb.report(0.92, "storing the DICOM WSI series")
        self._delete_series(series.series_instance_uid)  # converted before: replace, never duplicate
        parents: dict = {}
        for i, path in enumerate(series.files):
            r = self.client._request("POST", "/instances", data=path.read_bytes(),
                                     headers={"Content-Type": "application/dicom"})
            if r.status_code != 200:
                raise OrthancUnavailable(f"Orthanc refused WSI instance {i + 1}/{len(series.files)}: "
                                         f"{r.status_code} {r.text[:200]}")
            parents = r.json()
            hb.report(0.92 + 0.08 * (i + 1) / len(series.files), f"stored {i + 1}/{len(series.files)} instances")
        timings = {**series.timings, "store": round(time.perf_counter() - t, 3)}
        t = time.perf_counter()
        annotations = self._annotate_converted(slide, series.files, slide_key)
        if annotations is not None:
            timings["annotations"] = round(time.perf_counter() - t, 3)
        log.info("slide %s: DICOM WSI series of %d instance(s), %d level(s), in %s", slide["id"], len(series.files),
                 len(series.levels), timings)
        return {"study_instance_uid": series.study_instance_uid, "series_instance_uid": series.series_instance_uid,
                "orthanc_study_id": parents.get("ParentStudy"), "orthanc_series_id": parents.get("ParentSeries"),
                "instances": len(series.files), "levels": [list(size) for size in series.levels],
                "dicomizer": f"{DICOMIZER} {series.dicomizer_version}".strip(), "timings": timings,
                "annotations": annotations}

    def _annotate_converted(self, slide: dict, files: list[Path], slide_key: str) -> int | None:
        """The nuclei of the slide's analysis as Microscopy Bulk Simple Annotations on the converted level-0
        image, so that a DICOM viewer (OHIF's microscopy mode, Slim) overlays them; None before an analysis."""
        import pydicom

        r = self.client._request("GET", f"/ai/slides/{slide['id']}/report")
        if r.status_code != 200:
            return None  # not analysed (yet): converting does not wait for it
        detector = (r.json().get("audit") or {}).get("model") or {}
        classes = tuple(detector.get("classes") or ())
        if not classes:
            return None
        folder = self.root / "dicom"
        geo = folder / "nuclei.geojson.gz"
        self._download(f"/ai/slides/{slide['id']}/nuclei.geojson.gz", geo)
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
        level0 = max(headers, key=lambda ds: int(ds.TotalPixelMatrixColumns) * int(ds.TotalPixelMatrixRows))
        store = NucleusStore(folder / "nuclei.sqlite")
        try:
            count = read_geojson_into(store, geo, classes)
            source = D.complete_source(level0, slide["source"].get("filename") or slide["id"], slide_key)
            for ds in D.nuclei_annotations(store, source, classes, detector, slide_key=slide_key):
                self.client.store(ds)
        finally:
            store.close()
        return count

    def _delete_series(self, series_instance_uid: str) -> None:
        r = self.client._request("POST", "/tools/lookup", data=series_instance_uid)
        r.raise_for_status()
        for hit in r.json():
            if hit.get("Type") == "Series":
                self.client._request("DELETE", f"/series/{hit['ID']}").raise_for_status()

    @staticmethod
    def _slide_key(slide: dict) -> str:
        """What identifies the slide's content (its file's SHA-256): results' and conversions' UIDs derive from it."""
        return slide["source"].get("sha256") or slide["source"].get("series_instance_uid") or slide["id"]

    def _study(self, slide: dict, slide_key: str) -> D.StudyContext:
        """The study of a vendor file's results: the one named at upload (if in Orthanc) or a new one."""
        given = slide.get("study") or {}
        uid = given.get("study_instance_uid")
        if uid:
            r = self.client._request("POST", "/tools/lookup", data=uid)
            hits = [h for h in (r.json() if r.status_code == 200 else []) if h.get("Type") == "Study"]
            if hits:
                study = self.client.get_json(f"/studies/{hits[0]['ID']}")
                tags, patient = study.get("MainDicomTags", {}), study.get("PatientMainDicomTags", {})
                return D.StudyContext(
                    study_instance_uid=uid, patient_id=patient.get("PatientID", ""),
                    patient_name=patient.get("PatientName", ""), patient_birth_date=patient.get("PatientBirthDate", ""),
                    patient_sex=patient.get("PatientSex", ""), accession_number=tags.get("AccessionNumber", ""),
                    study_id=tags.get("StudyID", ""), study_date=tags.get("StudyDate", ""),
                    study_time=tags.get("StudyTime", ""), study_description=tags.get("StudyDescription", ""),
                    referring_physician_name=tags.get("ReferringPhysicianName", ""))
        created = slide.get("created_at") or ""
        date = created[:10].replace("-", "") if created else time.strftime("%Y%m%d")
        hour = created[11:19].replace(":", "") if len(created) >= 19 else time.strftime("%H%M%S")
        return D.StudyContext(study_instance_uid=uid or D.derived_uid("slide study", slide_key),
                              patient_id=given.get("patient_id", ""), patient_name=given.get("patient_name", ""),
                              accession_number=given.get("accession_number", ""), study_id="SLIDE",
                              study_date=date, study_time=hour,
                              study_description=given.get("study_description") or f"Slide {slide['source'].get('filename') or ''}".strip())

    def _source_json(self, slide: dict) -> dict:
        src = slide["source"]
        sha = src.get("sha256") or self._sha256 or hashlib.sha256(slide["id"].encode()).hexdigest()
        return {"kind": src["kind"], "filename": src.get("filename"), "sha256": sha, "size_bytes": src.get("size_bytes"),
                "study_instance_uid": src.get("study_instance_uid"), "series_instance_uid": src.get("series_instance_uid")}

    @staticmethod
    def _parameters(settings: SlideSettings, detector: dict | None) -> dict:
        return {"qc": settings.qc.to_json(), "tissue": settings.tissue.to_json(),
                "aggregation": settings.aggregation.to_json(), "declared_mpp": settings.declared_mpp,
                "nuclei_model": settings.nuclei_model, "detector_parameters": (detector or {}).get("parameters")}

