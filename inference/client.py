"""Orthanc REST client for the worker: read a series, store results, talk to the /ai/ job routes."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pydicom
import requests

from inference.volume import read_instance


class OrthancUnavailable(Exception):
    """Orthanc did not answer (network error or 5xx): the job is worth retrying."""


class KeepAliveSession(requests.Session):
    """A session that sends a request once more when a kept-alive connection was closed under it.

    Orthanc (CivetWeb) closes a kept-alive connection after one second idle. A request sent on it at that very
    moment gets no answer (``RemoteDisconnected``): the server never read it, so sending it again on a new
    connection is safe. Timeouts are not retried (the server may still be working on the request), nor bodies
    that are streams (they cannot be read twice)."""

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        try:
            return super().request(method, url, *args, **kwargs)
        except requests.ConnectionError as exc:
            if isinstance(exc, requests.Timeout) or hasattr(kwargs.get("data"), "read"):
                raise
            return super().request(method, url, *args, **kwargs)


class OrthancClient:
    #: concurrent requests when reading a series or storing results (Orthanc serves files on several threads;
    #: one request at a time leaves the worker waiting on round trips)
    FETCH_THREADS = 4

    def __init__(self, url: str, auth: tuple[str, str] | None = None, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.auth = auth
        self.session = KeepAliveSession()
        self.session.auth = auth
        self.timeout = timeout
        self._local = threading.local()

    def _session(self) -> requests.Session:
        """The calling thread's session (a ``requests.Session`` is not meant to be shared between threads)."""
        if threading.current_thread() is threading.main_thread():
            return self.session
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = KeepAliveSession()
            session.auth = self.auth
        return session

    def _request(self, method: str, uri: str, **kwargs: Any) -> requests.Response:
        try:
            r = self._session().request(method, self.url + uri, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
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
        # Uncompressed: Orthanc gzips every answer a client accepts gzip for, which costs it ~10 ms of CPU per
        # 256 kB slice — more than the transfer itself on a hospital network, and most of a series' read time.
        r = self._request("GET", f"/instances/{orthanc_instance_id}/file", headers={"Accept-Encoding": "identity"})
        r.raise_for_status()
        return r.content

    def iter_series_datasets(self, orthanc_series_id: str) -> Iterator[tuple[int, int, pydicom.Dataset]]:
        """Yield (index, count, dataset) for each instance of a series, in Orthanc's order.

        Up to ``FETCH_THREADS`` instances are downloaded and parsed at once (at most that many ahead of the
        consumer); the first unreadable instance raises, naming it, and the remaining downloads are dropped.
        """
        ids = self.series_instance_ids(orthanc_series_id)

        def fetch(instance_id: str) -> pydicom.Dataset:
            # read_instance notices truncated elements, which pydicom alone reads silently
            return read_instance(self.instance_bytes(instance_id), name=f"instance {instance_id}")

        if len(ids) < 2 or self.FETCH_THREADS < 2:
            for i, instance_id in enumerate(ids):
                yield i, len(ids), fetch(instance_id)
            return
        with ThreadPoolExecutor(self.FETCH_THREADS, thread_name_prefix="fetch") as pool:
            pending = [pool.submit(fetch, instance_id) for instance_id in ids[:self.FETCH_THREADS]]
            try:
                for i in range(len(ids)):
                    ds = pending[i].result()
                    ahead = i + self.FETCH_THREADS
                    if ahead < len(ids):
                        pending.append(pool.submit(fetch, ids[ahead]))
                    pending[i] = None  # type: ignore[call-overload]  # let the dataset go once yielded
                    yield i, len(ids), ds
            finally:
                for future in pending:
                    if future is not None:
                        future.cancel()

    def store_all(self, datasets: list[pydicom.Dataset], *, replace: bool = True) -> list[str]:
        """Store several results concurrently; every one is attempted, and the first failure is raised after."""
        if len(datasets) < 2:
            return [self.store(ds, replace=replace) for ds in datasets]
        with ThreadPoolExecutor(min(len(datasets), self.FETCH_THREADS), thread_name_prefix="store") as pool:
            futures = [pool.submit(self.store, ds, replace=replace) for ds in datasets]
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error
        return [f.result() for f in futures]

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
