"""WADO-RS series metadata with the binary-valued elements of annotations intact.

Orthanc 1.10's DICOM JSON writes an element of VR OF, OD, OL or OV as ``"Value": [<its first number>]``,
where PS3.18 F.2.7 requires ``InlineBinary`` or ``BulkDataURI``. A Microscopy Bulk Simple Annotations
instance (ANN) keeps all its point coordinates and indices in such elements, so OHIF's microscopy mode
receives one number for thousands of nuclei and draws nothing.

This module answers ``GET /dicom-web/studies/{study}/series/{series}/metadata`` before the DICOMweb plugin
(the Python plugin is loaded first, and Orthanc gives a URI to the first plugin whose pattern matches it):

- for an ANN series, from the stored files, every element as in the DICOM file (binary ones inline);
- for every other series, what the DICOMweb plugin answers: its study's metadata (``…/studies/{study}/metadata``)
  cut to the series when the series is at least half of the study (one call, cheaper per instance), else its
  instances' metadata (``…/instances/{sop}/metadata``) joined; this module takes neither route.

A plugin callback may not decline a request, hence the second case. Answers are kept while their series is
unchanged (a viewer asks again for every series when results arrive). ``tests/bench/bench_dicomweb.py``
measures the cost against the DICOMweb plugin's own answer; ``"AI": {"AnnotationMetadata": false}`` leaves the
route to the DICOMweb plugin.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections import OrderedDict
from typing import Any, Callable

log = logging.getLogger("orthanc-ai.dicomweb")

ROUTE = "/dicom-web/studies/([^/]+)/series/([^/]+)/metadata"
ANN_MODALITY = "ANN"
DICOM_JSON = "application/dicom+json"
STUDY_ROUTE_SHARE = 0.5  # a series with at least this share of its study's instances: cut from the study's metadata


class NotFound(Exception):
    pass


# What the DICOMweb plugin puts before its bulk data URIs when a request has no Host header (our internal calls)
# and no "Host" is configured: replaced by the base the client's request gives.
_INTERNAL_BASES = ("http://localhost:8042", "https://localhost:8042")


def public_base(headers: dict[str, str], dicomweb: dict) -> str | None:
    """``scheme://host`` as the DICOMweb plugin writes it for this request (its ``Host``/``Ssl`` settings, else the
    request's ``Forwarded`` or ``Host`` header); None when a configured ``Host`` makes it the same for every call."""
    if dicomweb.get("Host"):
        return None
    ssl = bool(dicomweb.get("Ssl", False))
    host, proto = headers.get("host"), None
    for part in (headers.get("forwarded") or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "host" and value:
            host = value.strip('"')
        elif key.lower() == "proto" and value:
            proto = value.strip('"')
    if not host:
        return None
    return f"{proto or ('https' if ssl else 'http')}://{host}"


class MetadataCache:
    """The last answers, by series, while the series is unchanged (same instances, same ``LastUpdate``): a
    viewer asks again for every series of a study when results arrive. Bounded in bytes, least recently used
    out first."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes, self.size = max_bytes, 0
        self.entries: OrderedDict[str, tuple[tuple, str]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, series_id: str, version: tuple) -> str | None:
        with self.lock:
            entry = self.entries.get(series_id)
            if entry is None or entry[0] != version:
                return None
            self.entries.move_to_end(series_id)
            return entry[1]

    def put(self, series_id: str, version: tuple, text: str) -> None:
        with self.lock:
            old = self.entries.pop(series_id, None)
            if old is not None:
                self.size -= len(old[1])
            if len(text) > self.max_bytes // 4:
                return  # one huge series must not push out everything else
            self.entries[series_id] = (version, text)
            self.size += len(text)
            while self.size > self.max_bytes:
                _, (_, dropped) = self.entries.popitem(last=False)
                self.size -= len(dropped)


def series_metadata(study_uid: str, series_uid: str, *, rest_get: Callable[[str], bytes],
                    rest_post: Callable[[str, bytes], bytes], rest_get_after_plugins: Callable[[str], bytes],
                    root: str = "/dicom-web/", base: str | None = None, cache: MetadataCache | None = None) -> str:
    """The series' DICOM JSON (a JSON array with one object per instance), as text. ``base`` (``scheme://host``)
    replaces the one the DICOMweb plugin gives internal calls in bulk data URIs."""
    hits = json.loads(rest_post("/tools/lookup", series_uid.encode()))
    series_id = next((h["ID"] for h in hits if h.get("Type") == "Series"), None)
    if series_id is None:
        raise NotFound(f"no series {series_uid}")
    series = json.loads(rest_get(f"/series/{series_id}"))
    study = json.loads(rest_get(f"/studies/{series['ParentStudy']}"))
    if study.get("MainDicomTags", {}).get("StudyInstanceUID") != study_uid:
        raise NotFound(f"series {series_uid} is not in study {study_uid}")
    version = (series.get("LastUpdate"), tuple(series.get("Instances") or ()), root)
    text = cache.get(series_id, version) if cache is not None else None
    if text is None:
        text = _series_text(study_uid, series_uid, series_id, series, rest_get, rest_get_after_plugins, root)
        if cache is not None:
            cache.put(series_id, version, text)
    if base:
        for internal in _INTERNAL_BASES:
            text = text.replace(f'"{internal}{root}', f'"{base}{root}')
    return text


def _series_text(study_uid: str, series_uid: str, series_id: str, series: dict, rest_get: Callable[[str], bytes],
                 rest_get_after_plugins: Callable[[str], bytes], root: str) -> str:
    instances = json.loads(rest_get(f"/series/{series_id}/instances"))
    if series.get("MainDicomTags", {}).get("Modality") == ANN_MODALITY:
        return json.dumps([_from_file(rest_get(f"/instances/{i['ID']}/file")) for i in instances])
    siblings = json.loads(rest_get(f"/studies/{series['ParentStudy']}/series"))
    study_size = sum(len(s.get("Instances") or ()) for s in siblings)
    if len(instances) >= STUDY_ROUTE_SHARE * study_size:
        # most of the study: its metadata in one call (far cheaper per instance), this series' part of it kept
        text = rest_get_after_plugins(f"{root.rstrip('/')}/studies/{study_uid}/metadata").decode()
        return text if len(instances) == study_size else _instances_of_series(text, series_uid)
    prefix = f"{root.rstrip('/')}/studies/{study_uid}/series/{series_uid}/instances/"

    def one(instance: dict) -> str:
        sop = instance.get("MainDicomTags", {}).get("SOPInstanceUID")
        text = rest_get_after_plugins(f"{prefix}{sop}/metadata").decode().strip()
        return text[1:-1].strip() if text.startswith("[") and text.endswith("]") else ""

    # one after the other: a thread pool was slower (measured: the calls do not run in parallel)
    return "[" + ",".join(part for part in map(one, instances) if part) + "]"


def _instances_of_series(study_text: str, series_uid: str) -> str:
    """The objects of a study's DICOM JSON array that belong to the series, their text kept as it is."""
    decoder, parts, i = json.JSONDecoder(), [], study_text.index("[") + 1
    while True:
        while study_text[i] in " \t\r\n,":
            i += 1
        if study_text[i] == "]":
            return "[" + ",".join(parts) + "]"
        instance, end = decoder.raw_decode(study_text, i)
        if (instance.get("0020000E", {}).get("Value") or [None])[0] == series_uid:
            parts.append(study_text[i:end])
        i = end


def _from_file(data: bytes) -> dict[str, Any]:
    """DICOM JSON of a stored instance: binary elements inline (annotations are small next to images)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    return ds.to_json_dict(bulk_data_threshold=1 << 62)


def register(orthanc: Any, dicomweb: dict | None = None) -> None:
    dicomweb = dicomweb or {}
    root = "/" + str(dicomweb.get("Root", "/dicom-web/")).strip("/") + "/"
    cache = MetadataCache()
    route = ROUTE.replace("/dicom-web/", root, 1)

    def serve(output, uri, **request) -> None:
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
            return
        study_uid, series_uid = request["groups"][:2]
        try:
            body = series_metadata(study_uid, series_uid, rest_get=orthanc.RestApiGet,
                                   rest_post=orthanc.RestApiPost,
                                   rest_get_after_plugins=orthanc.RestApiGetAfterPlugins, root=root, cache=cache,
                                   base=public_base({k.lower(): v for k, v in (request.get("headers") or {}).items()},
                                                    dicomweb))
        except NotFound:
            output.SendHttpStatusCode(404)
            return
        except Exception as exc:  # a broken file must not take the viewer down with a stack trace
            if "Unknown resource" in str(exc):  # gone meanwhile, or no DICOMweb plugin behind this route
                output.SendHttpStatusCode(404)
                return
            log.warning("series metadata failed: %s", type(exc).__name__)
            output.SendHttpStatusCode(500)
            return
        output.AnswerBuffer(body, DICOM_JSON)

    orthanc.RegisterRestCallback(route, serve)
