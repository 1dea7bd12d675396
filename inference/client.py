"""Orthanc REST client for the worker: read a series, store results, talk to the /ai/ job routes."""

from __future__ import annotations

import io
from typing import Any, Iterator

import pydicom
import requests

from inference.volume import read_instance


class OrthancUnavailable(Exception):
    """Orthanc did not answer (network error or 5xx): the job is worth retrying."""


class OrthancClient:
    def __init__(self, url: str, auth: tuple[str, str] | None = None, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.auth = auth
        self.timeout = timeout

    def _request(self, method: str, uri: str, **kwargs: Any) -> requests.Response:
        try:
            r = self.session.request(method, self.url + uri, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        except requests.RequestException as exc:
            raise OrthancUnavailable(f"Orthanc at {self.url} did not answer: {exc}") from exc
        if r.status_code >= 500:
            raise OrthancUnavailable(f"Orthanc answered {r.status_code} to {method} {uri}: {r.text[:200]}")
        return r

    def get_json(self, uri: str) -> Any:
        r = self._request("GET", uri)
        r.raise_for_status()
        return r.json()

    def post_json(self, uri: str, body: dict, *, timeout: float | None = None) -> requests.Response:
        return self._request("POST", uri, json=body, timeout=timeout or self.timeout)

    # -- images -----------------------------------------------------------------------------------
    def series_instance_ids(self, orthanc_series_id: str) -> list[str]:
        return list(self.get_json(f"/series/{orthanc_series_id}")["Instances"])

    def instance_bytes(self, orthanc_instance_id: str) -> bytes:
        r = self._request("GET", f"/instances/{orthanc_instance_id}/file")
        r.raise_for_status()
        return r.content

    def iter_series_datasets(self, orthanc_series_id: str) -> Iterator[tuple[int, int, pydicom.Dataset]]:
        """Yield (index, count, dataset) for each instance of a series (read one at a time)."""
        ids = self.series_instance_ids(orthanc_series_id)
        for i, instance_id in enumerate(ids):
            # read_instance notices truncated elements, which pydicom alone reads silently
            yield i, len(ids), read_instance(self.instance_bytes(instance_id), name=f"instance {instance_id}")

    # -- results ----------------------------------------------------------------------------------
    def store(self, dataset: pydicom.Dataset, *, replace: bool = True) -> str:
        """POST a dataset to /instances; with ``replace`` an instance with the same SOP Instance UID is
        deleted first, so a re-run replaces its earlier result instead of being ignored."""
        if replace:
            self.delete_instance_uid(str(dataset.SOPInstanceUID))
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        r = self._request("POST", "/instances", data=buffer.getvalue(),
                          headers={"Content-Type": "application/dicom"})
        if r.status_code != 200:
            raise RuntimeError(f"Orthanc refused the result {dataset.SOPInstanceUID}: {r.status_code} {r.text[:300]}")
        return r.json()["ID"]

    def delete_instance_uid(self, sop_instance_uid: str) -> bool:
        r = self._request("POST", "/tools/lookup", data=sop_instance_uid)
        r.raise_for_status()
        deleted = False
        for hit in r.json():
            if hit.get("Type") == "Instance":
                self._request("DELETE", f"/instances/{hit['ID']}").raise_for_status()
                deleted = True
        return deleted
