"""Series metadata answered by the plugin: ANN series from their files (binary elements inline), every other series
as the DICOMweb plugin's per-instance answers joined, with bulk data URIs on the client's host."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from orthanc_plugin.dicomweb_metadata import MetadataCache, NotFound, public_base, series_metadata

STUDY, SERIES = "1.2.3", "1.2.3.4"


def ann_file() -> bytes:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.91.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = STUDY, SERIES, "ANN"
    group = pydicom.Dataset()
    group.add_new(0x00660016, "OF", np.arange(2000, dtype=np.float32).tobytes())  # PointCoordinatesData
    group.add_new(0x00660040, "OL", np.arange(0, 2000, 8, dtype=np.uint32).tobytes())  # LongPrimitivePointIndexList
    ds.AnnotationGroupSequence = [group]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class FakeOrthanc:
    """Study t1 holds series s1 (3 instances) and, with ``others``, another series of that many instances."""

    def __init__(self, modality: str, study_uid: str = STUDY, others: int = 0) -> None:
        self.modality, self.study_uid, self.others = modality, study_uid, others
        self.after_plugins: list[str] = []
        self.last_update = "20261122T010203"

    def post(self, uri: str, body: bytes) -> bytes:
        assert uri == "/tools/lookup"
        return json.dumps([{"Type": "Series", "ID": "s1"}] if body.decode() == SERIES else []).encode()

    def get(self, uri: str) -> bytes:
        answers = {"/series/s1": {"ParentStudy": "t1", "MainDicomTags": {"Modality": self.modality},
                                  "LastUpdate": self.last_update, "Instances": ["i0", "i1", "i2"]},
                   "/studies/t1": {"MainDicomTags": {"StudyInstanceUID": self.study_uid}},
                   "/studies/t1/series": [{"Instances": ["i0", "i1", "i2"]}, {"Instances": ["o"] * self.others}],
                   "/series/s1/instances": [{"ID": f"i{n}", "MainDicomTags": {"SOPInstanceUID": f"1.9.{n}"}}
                                            for n in range(3)]}
        if uri.endswith("/file"):
            return ann_file()
        return json.dumps(answers[uri]).encode()

    @staticmethod
    def instance_json(sop: str, series: str = SERIES) -> dict:
        return {"00080018": {"vr": "UI", "Value": [sop]}, "0020000E": {"vr": "UI", "Value": [series]},
                "7FE00010": {"vr": "OW", "BulkDataURI": f"http://localhost:8042/dicom-web/studies/{STUDY}/series/"
                                                        f"{series}/instances/{sop}/bulk/7FE00010"}}

    def get_after_plugins(self, uri: str) -> bytes:
        self.after_plugins.append(uri)
        if uri == f"/dicom-web/studies/{STUDY}/metadata":  # ours interleaved with the other series'
            mixed = [self.instance_json("1.8.0", "1.2.3.9")] * min(self.others, 1) + [
                self.instance_json(f"1.9.{n}") for n in range(3)] + [
                self.instance_json(f"1.8.{n}", "1.2.3.9") for n in range(1, self.others)]
            return json.dumps(mixed, indent=1).encode()
        return json.dumps([self.instance_json(uri.split("/instances/")[1].split("/")[0])]).encode()

    def metadata(self, **kw) -> list[dict]:
        return json.loads(series_metadata(STUDY, SERIES, rest_get=self.get, rest_post=self.post,
                                          rest_get_after_plugins=self.get_after_plugins, **kw))


def test_annotation_coordinates_come_inline_from_the_file() -> None:
    orthanc = FakeOrthanc("ANN")
    metadata = orthanc.metadata()
    assert len(metadata) == 3 and not orthanc.after_plugins
    group = metadata[0]["006A0002"]["Value"][0]
    assert np.array_equal(np.frombuffer(base64.b64decode(group["00660016"]["InlineBinary"]), np.float32),
                          np.arange(2000, dtype=np.float32))
    assert np.array_equal(np.frombuffer(base64.b64decode(group["00660040"]["InlineBinary"]), np.uint32),
                          np.arange(0, 2000, 8))


def test_a_series_that_is_most_of_its_study_is_cut_from_the_study_metadata() -> None:
    alone, mixed = FakeOrthanc("MR"), FakeOrthanc("MR", others=2)
    for orthanc in (alone, mixed):
        metadata = orthanc.metadata(base="https://pacs.example:443")
        assert [m["00080018"]["Value"][0] for m in metadata] == ["1.9.0", "1.9.1", "1.9.2"]
        assert orthanc.after_plugins == [f"/dicom-web/studies/{STUDY}/metadata"]
        assert metadata[1]["7FE00010"]["BulkDataURI"].startswith(f"https://pacs.example:443/dicom-web/studies/{STUDY}/")


def test_a_small_part_of_a_study_is_the_dicomweb_plugins_instance_answers_joined() -> None:
    orthanc = FakeOrthanc("MR", others=10)
    metadata = orthanc.metadata(base="https://pacs.example:443")
    assert [m["00080018"]["Value"][0] for m in metadata] == ["1.9.0", "1.9.1", "1.9.2"]
    assert orthanc.after_plugins == [f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/1.9.{n}/metadata"
                                     for n in range(3)]
    assert metadata[1]["7FE00010"]["BulkDataURI"].startswith(f"https://pacs.example:443/dicom-web/studies/{STUDY}/")
    assert FakeOrthanc("MR", others=10).metadata()[0]["7FE00010"]["BulkDataURI"].startswith("http://localhost:8042/")


def test_unknown_series_or_another_study_is_not_found() -> None:
    with pytest.raises(NotFound):
        json.loads(series_metadata(STUDY, "9.9", rest_get=FakeOrthanc("MR").get, rest_post=FakeOrthanc("MR").post,
                                   rest_get_after_plugins=FakeOrthanc("MR").get_after_plugins))
    with pytest.raises(NotFound):
        FakeOrthanc("MR", study_uid="7.7").metadata()


def test_public_base_follows_the_dicomweb_plugins_rules() -> None:
    assert public_base({"host": "viewer.local:8042"}, {}) == "http://viewer.local:8042"
    assert public_base({"host": "viewer.local"}, {"Ssl": True}) == "https://viewer.local"
    assert public_base({"host": "a", "forwarded": 'for=1.2.3.4;host="pacs.example";proto=https'}, {}) == \
        "https://pacs.example"
    assert public_base({"host": "a"}, {"Host": "configured:8042"}) is None  # the same for every call
    assert public_base({}, {}) is None


def test_an_unchanged_series_is_answered_from_the_cache_on_each_clients_host() -> None:
    orthanc, cache = FakeOrthanc("MR", others=10), MetadataCache()
    first = orthanc.metadata(base="http://a:1", cache=cache)
    again = orthanc.metadata(base="http://b:2", cache=cache)
    assert len(orthanc.after_plugins) == 3  # the second answer came from the cache
    assert first[0]["7FE00010"]["BulkDataURI"].startswith("http://a:1/") and \
        again[0]["7FE00010"]["BulkDataURI"].startswith("http://b:2/")
    orthanc.last_update = "20261122T020304"  # an instance was added or replaced
    orthanc.metadata(cache=cache)
    assert len(orthanc.after_plugins) == 6


def test_the_cache_keeps_to_its_size_least_recently_used_out_first() -> None:
    cache = MetadataCache(max_bytes=400)
    for n in range(4):
        cache.put(f"s{n}", ("v",), "x" * 100)
    assert cache.get("s0", ("v",)) == "x" * 100  # s0 used: s1 is now the oldest
    cache.put("s4", ("v",), "y" * 100)
    assert cache.get("s1", ("v",)) is None and cache.get("s0", ("v",)) and cache.size <= 400
    cache.put("big", ("v",), "z" * 101)  # over a quarter of the cache: not kept
    assert cache.get("big", ("v",)) is None
    assert cache.get("s0", ("w",)) is None  # another version of the series
