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
