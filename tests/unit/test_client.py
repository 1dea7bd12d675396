"""The worker's Orthanc client reads a series several instances at a time and stores results concurrently,
without changing what the pipeline sees: the same datasets in Orthanc's order, the first bad instance named."""

from __future__ import annotations

import io
import random
import threading
import time

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.client import OrthancClient
from inference.volume import VolumeError


def instance(number: int) -> bytes:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class SlowOrthanc(OrthancClient):
    """Answers instance downloads after a random delay, from several threads at once."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__("http://orthanc.invalid")
        self.files, self.active, self.most_active = files, 0, 0
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def series_instance_ids(self, orthanc_series_id: str) -> list[str]:
        return list(self.files)

    def instance_bytes(self, orthanc_instance_id: str) -> bytes:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.threads.add(threading.current_thread().name)
        time.sleep(random.uniform(0.0, 0.02))
        with self.lock:
            self.active -= 1
        return self.files[orthanc_instance_id]


def test_series_datasets_come_in_orthanc_order_while_several_download_at_once() -> None:
    files = {f"id{n:02d}": instance(n) for n in range(30)}
    client = SlowOrthanc(files)
    seen = [(i, count, int(ds.InstanceNumber)) for i, count, ds in client.iter_series_datasets("series")]
    assert seen == [(n, 30, n) for n in range(30)]
    assert client.most_active in range(2, OrthancClient.FETCH_THREADS + 1), client.most_active
    assert len(client.threads) > 1


def test_a_truncated_instance_is_named_and_stops_the_read() -> None:
    files = {f"id{n:02d}": instance(n) for n in range(12)}
    files["id05"] = files["id05"][:-1]
    client = SlowOrthanc(files)
    got = []
    with pytest.raises(VolumeError, match="instance id05"):
        for _, _, ds in client.iter_series_datasets("series"):
            got.append(int(ds.InstanceNumber))
    assert got == [0, 1, 2, 3, 4]


def test_store_all_attempts_every_result_and_raises_the_first_failure() -> None:
    client = OrthancClient("http://orthanc.invalid")
    datasets = [pydicom.dcmread(io.BytesIO(instance(n))) for n in range(4)]
    stored: list[int] = []
    lock = threading.Lock()

    def store(ds: pydicom.Dataset, *, replace: bool = True) -> str:
        if int(ds.InstanceNumber) == 1:
            raise RuntimeError("Orthanc refused the result")
        with lock:
            stored.append(int(ds.InstanceNumber))
        return f"orthanc-{ds.InstanceNumber}"

    client.store = store  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="refused"):
        client.store_all(datasets)
    assert sorted(stored) == [0, 2, 3]
    stored.clear()
    assert client.store_all([datasets[0], datasets[2]]) == ["orthanc-0", "orthanc-2"]


def _server(behaviours: list[str]) -> tuple[int, list[bytes]]:
    """A one-shot HTTP server on a real socket: for each connection, 'drop' reads the request and closes without
    answering (what Orthanc does to a kept-alive connection idle for one second), 'ok' answers 200, 'hang' never
    answers."""
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    seen: list[bytes] = []

    def serve() -> None:
        for behaviour in behaviours:
            conn, _ = listener.accept()
            seen.append(conn.recv(65536))
            if behaviour == "ok":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            elif behaviour == "hang":
                time.sleep(1.5)
            conn.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], seen


def test_a_request_dropped_unanswered_is_sent_once_more_on_a_new_connection() -> None:
    port, seen = _server(["drop", "ok"])
    client = OrthancClient(f"http://127.0.0.1:{port}", timeout=5)
    assert client.post_json("/ai/worker/claim", {"worker": "w"}).status_code == 200
    assert len(seen) == 2 and seen[0].split(b"\r\n")[0] == seen[1].split(b"\r\n")[0] == b"POST /ai/worker/claim HTTP/1.1"


def test_a_second_drop_or_a_timeout_is_not_retried() -> None:
    from inference.client import OrthancUnavailable
    port, seen = _server(["drop", "drop"])
    with pytest.raises(OrthancUnavailable):
        OrthancClient(f"http://127.0.0.1:{port}", timeout=5).get_json("/system")
    assert len(seen) == 2
    port, seen = _server(["hang"])
    with pytest.raises(OrthancUnavailable):
        OrthancClient(f"http://127.0.0.1:{port}", timeout=0.5).get_json("/system")
    time.sleep(1.6)
    assert len(seen) == 1  # the server may still be working on it: not sent twice
