"""The real brain-lesion case (pyradiomics brain1, NRRD image + label) as a DICOM series, end to end: sent by
C-STORE, segmented by each default model, the SEG read back and scored against the reference label.

Floors sit below the figures measured offline (classical Dice 0.68 on its own tuning case; our UNet Dice
0.46 held out), so the test fails if the end-to-end path loses accuracy the models have.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from inference.results.seg import read_segmentation
from tests.bench.eval_brain_lesion import reference_mask, scores, volume_from_nrrd

FLOORS = {"brain-lesion-candidates": 0.55, "brain-lesion-unet": 0.30}


def brain1_as_dicom(shared: Path, out: Path, template: pydicom.Dataset) -> tuple[str, list[str]]:
    """Write brain1 as an MR series (one slice per k); returns (StudyInstanceUID, SOP UIDs by slice)."""
    volume = volume_from_nrrd(shared / "brain_lesion" / "pyradiomics_brain1_image.nrrd")
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    col_dir, row_dir, k_dir = (volume.affine[:3, i] for i in range(3))
    out.mkdir(parents=True, exist_ok=True)
    uids = []
    for k in range(volume.shape[0]):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName, ds.SeriesDescription = "BRAIN1", "Brain1^Pyradiomics", "T1 brain1"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in volume.affine[:3, 3] + k * k_dir]
        ds.ImageOrientationPatient = [float(v) for v in (*col_dir / np.linalg.norm(col_dir),
                                                          *row_dir / np.linalg.norm(row_dir))]
        ds.PixelSpacing = [float(np.linalg.norm(row_dir)), float(np.linalg.norm(col_dir))]
        ds.SliceThickness = float(np.linalg.norm(k_dir))
        pixels = volume.array[k].astype(np.int16)
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = pixels.tobytes()
        ds.save_as(out / f"{k:03d}.dcm", enforce_file_format=True)
        uids.append(ds.SOPInstanceUID)
    return study, uids


@pytest.fixture(scope="module")
def brain1(orthanc, shared_data, tmp_path_factory):
    template = pydicom.dcmread(shared_data / "mr" / "MR_small.dcm")
    folder = tmp_path_factory.mktemp("brain1")
    study, uids = brain1_as_dicom(shared_data, folder, template)
    orthanc.storescu(folder)
    orthanc.wait_jobs(study, 1, timeout=300)  # the default rule's classical job
    r = orthanc.post(f"/ai/studies/{study}/segment", {"model": "brain-lesion-unet"})
    assert r.status_code == 202, r.text
    jobs = orthanc.wait_jobs(study, 2, timeout=600)
    return study, uids, {j["model_id"]: j for j in jobs}


@pytest.mark.parametrize("model", sorted(FLOORS))
def test_default_model_on_brain1_through_dicom(brain1, orthanc, shared_data, model):
    study, uids, jobs = brain1
    job = jobs[model]
    assert job["state"] == "done", job
    seg_uid = next(u for u in job["outputs"] if u in _seg_uids(orthanc, study))
    hit = orthanc.session.post(orthanc.url + "/tools/lookup", data=seg_uid).json()[0]
    seg = pydicom.dcmread(io.BytesIO(orthanc.session.get(f"{orthanc.url}/instances/{hit['ID']}/file").content))
    (mask,) = read_segmentation(seg)
    predicted = np.stack([mask.frames[(uid, None)] > 0.5 for uid in uids])
    reference = reference_mask(shared_data / "brain_lesion" / "pyradiomics_brain1_label.nrrd")
    result = scores(predicted, reference)
    voxel_ml = abs(np.linalg.det(volume_from_nrrd(shared_data / "brain_lesion" / "pyradiomics_brain1_image.nrrd")
                                 .affine[:3, :3])) / 1000
    volume_error = abs(int(predicted.sum()) - int(reference.sum())) * voxel_ml
    print(f"{model}: Dice {result['dice']:.3f}, absolute volume error {volume_error:.1f} mL")
    assert result["dice"] >= FLOORS[model], result
    assert result["detected_lesions"] == result["reference_lesions"]


def _seg_uids(orthanc, study: str) -> set[str]:
    out = set()
    for series in orthanc.series_of_study(study):
        if series["MainDicomTags"].get("Modality") == "SEG":
            for instance in series["Instances"]:
                out.add(orthanc.get(f"/instances/{instance}")["MainDicomTags"]["SOPInstanceUID"])
    return out
