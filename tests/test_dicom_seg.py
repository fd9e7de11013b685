"""DICOM SEG masks: GET /segmentations/{id}/mask?format=dicom-seg, dataset label_codes, exports with dicom-seg.

Every SEG is read back with highdicom/pydicom and mapped back onto the NIfTI grid through its frames'
plane positions (not through crowdsam's own geometry code): it must equal the NIfTI mask voxel for voxel.
Finished segmentations are real rows with a stored mask (tests/helpers_exporteval.py), no SAM run.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.conftest import ABDOMEN_LABELS, CT_DIR, TOTALSEG_MAP
from tests.dicom_helpers import reorient, write_series, zip_series
from tests.helpers_exporteval import add_finished_segmentation

SCT = {"spleen": "78961009", "kidney_right": "64033007", "kidney_left": "64033007", "liver": "10200004",
       "aorta": "15825003"}
LATERALITY = {"kidney_right": "Right", "kidney_left": "Left"}


def finished_segmentation(volume_id: int, **kw: Any) -> tuple[int, np.ndarray]:
    """A finished segmentation row with its stored mask (and the mask's sha256, as the job sets it)."""
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.segmentations.models import Segmentation

    seg_id, _, mask = add_finished_segmentation(volume_id, **kw)
    with session_scope() as session:
        row = session.get(Segmentation, seg_id)
        assert row is not None and row.mask_key is not None
        row.mask_sha256 = hashlib.sha256(get_storage().read_bytes(row.mask_key)).hexdigest()
        session.commit()
    return seg_id, mask


def get_seg(client: Any, tokens: Any, seg_id: int, **params: str) -> Any:
    return client.get(f"/api/v1/segmentations/{seg_id}/mask", params={"format": "dicom-seg", **params},
                      headers=tokens.headers("researcher"))


def read_seg(content: bytes) -> hd.seg.Segmentation:
    return hd.seg.segread(io.BytesIO(content))


def labels_from_seg(content: bytes, affine: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The SEG's frames put back on the NIfTI grid of ``affine``: each frame's slice k from its
    ImagePositionPatient, its pixels transposed (columns = i, rows = j), its segment's label value
    from the segment label (= dataset label name) → ABDOMEN_LABELS-style values by name."""
    seg = pydicom.dcmread(io.BytesIO(content))
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=float)[:3]
    axes, origin = lps[:, :3], lps[:, 3]
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    np.testing.assert_allclose(orientation[:3], axes[:, 0] / np.linalg.norm(axes[:, 0]), atol=1e-5)
    np.testing.assert_allclose(orientation[3:], axes[:, 1] / np.linalg.norm(axes[:, 1]), atol=1e-5)
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    np.testing.assert_allclose(spacing, np.linalg.norm(axes[:, [1, 0]], axis=0), atol=1e-5)
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    pixels = np.asarray(seg.pixel_array)
    pixels = pixels.reshape(-1, int(seg.Rows), int(seg.Columns))
    out = np.zeros(shape, dtype=np.int32)
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        position = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        i, j, k = np.linalg.solve(axes, position - origin)
        assert abs(i) < 1e-3 and abs(j) < 1e-3 and abs(k - round(k)) < 1e-3
        identification = frame.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = int(identification[0].ReferencedSegmentNumber)
        plane = out[:, :, round(k)]
        plane[pixels[n].T.astype(bool)] = ABDOMEN_LABELS.get(names[number], 99)
    return out


def check_segments(seg: hd.seg.Segmentation, expected: list[str], *, model: str = "litemedsam") -> None:
    segments = list(seg.SegmentSequence)
    assert [s.SegmentLabel for s in segments] == expected
    assert [int(s.SegmentNumber) for s in segments] == list(range(1, len(expected) + 1))
    for s in segments:
        category = s.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("91723000", "SCT")
        prop = s.SegmentedPropertyTypeCodeSequence[0]
        assert prop.CodingSchemeDesignator == "SCT" and prop.CodeValue == SCT[s.SegmentLabel]
        modifiers = prop.get("SegmentedPropertyTypeModifierCodeSequence", [])
        assert [m.CodeMeaning for m in modifiers] == ([LATERALITY[s.SegmentLabel]] if s.SegmentLabel in LATERALITY
                                                      else [])
        assert s.SegmentAlgorithmType == "SEMIAUTOMATIC"
        algorithm = s.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "crowdsam" and f"model={model}" in algorithm.AlgorithmParameters
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"


def present(mask: np.ndarray) -> list[str]:
    return [n for n, v in sorted(ABDOMEN_LABELS.items(), key=lambda kv: kv[1]) if (mask == v).any()]


def test_nifti_volume_mask_as_dicom_seg(client, tokens, sm_volume) -> None:  # type: ignore[no-untyped-def]
    vid = sm_volume["id"]
    seg_id, mask = finished_segmentation(vid)
    image = nib.load(str(CT_DIR / "example_ct_sm.nii.gz"))
    assert len(present(mask)) >= 3 and set(np.unique(mask)) - {0} <= set(ABDOMEN_LABELS.values())

    response = get_seg(client, tokens, seg_id)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    assert f'sm_seg{seg_id}.dcm' in response.headers["content-disposition"]
    seg = read_seg(response.content)
    check_segments(seg, present(mask))
    rebuilt = labels_from_seg(response.content, image.affine, image.shape)
    np.testing.assert_array_equal(rebuilt, mask)

    # the synthetic source series: one CT image per slice, the same study for every SEG of this volume
    referenced = seg.ReferencedSeriesSequence[0]
    assert len(referenced.ReferencedInstanceSequence) == image.shape[2]
    assert seg.PatientID == "sm" and seg.FrameOfReferenceUID
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage

    # deterministic bytes → a per-format ETag that can be revalidated
    nifti_etag = client.get(f"/api/v1/segmentations/{seg_id}/mask", headers=tokens.headers("researcher")
                            ).headers["etag"]
    etag = response.headers["etag"]
    assert etag != nifti_etag
    again = get_seg(client, tokens, seg_id)
    assert again.content == response.content and again.headers["etag"] == etag
    cached = client.get(f"/api/v1/segmentations/{seg_id}/mask?format=dicom-seg",
                        headers={**tokens.headers("researcher"), "If-None-Match": etag})
    assert cached.status_code == 304

    # label= → one segment; a label absent from the mask → that label as an empty segment
    liver = get_seg(client, tokens, seg_id, label="liver")
    assert liver.status_code == 200 and liver.headers["etag"] not in (etag, nifti_etag)
    assert f"sm_seg{seg_id}_liver.dcm" in liver.headers["content-disposition"]
    one = read_seg(liver.content)
    check_segments(one, ["liver"])
    np.testing.assert_array_equal(labels_from_seg(liver.content, image.affine, image.shape),
                                  np.where(mask == ABDOMEN_LABELS["liver"], ABDOMEN_LABELS["liver"], 0))
    assert one.StudyInstanceUID == seg.StudyInstanceUID and one.SOPInstanceUID != seg.SOPInstanceUID

    bad = client.get(f"/api/v1/segmentations/{seg_id}/mask?format=dicom", headers=tokens.headers("researcher"))
    assert bad.status_code == 422
    assert get_seg(client, tokens, seg_id, label="heart").status_code == 422
    assert client.get(f"/api/v1/segmentations/{seg_id}/mask?format=dicom-seg",
                      headers=tokens.headers("annotator")).status_code == 403


def test_label_without_code_is_refused_until_the_dataset_gives_one(client, tokens, run_jobs) -> None:  # type: ignore[no-untyped-def]
    headers = tokens.headers("researcher")
    labels = {"spleen": 1, "liver": 5, "lesion": 7}
    refused = client.post("/api/v1/datasets", headers=headers, json={
        "name": "bad", "labels": labels, "label_codes": {"heart": {"scheme": "SCT", "code": "1", "meaning": "x"}}})
    assert refused.status_code == 422 and "heart" in refused.text
    blank = client.post("/api/v1/datasets", headers=headers, json={
        "name": "bad", "labels": labels, "label_codes": {"lesion": {"scheme": "SCT", "code": " ", "meaning": "x"}}})
    assert blank.status_code == 422
    created = client.post("/api/v1/datasets", headers=headers, json={"name": "coded", "labels": labels})
    assert created.status_code == 201 and created.json()["label_codes"] is None
    did = created.json()["id"]
    upload = client.post(
        f"/api/v1/datasets/{did}/volumes", headers=headers,
        files={"image": ("ct.nii.gz", (CT_DIR / "example_ct_sm.nii.gz").read_bytes(), "application/gzip"),
               "reference": ("ref.nii.gz", (CT_DIR / "example_seg.nii.gz").read_bytes(), "application/gzip")},
        data={"case_id": "sm", "split": "train", "reference_other": "background",
              "reference_map": json.dumps({"1": "spleen", "5": "liver", "2": "lesion"})},
    )
    assert upload.status_code == 201, upload.text
    seg_id, mask = finished_segmentation(upload.json()["id"], labels=labels)
    assert (mask == 7).any()

    missing = get_seg(client, tokens, seg_id)
    assert missing.status_code == 422
    assert "lesion" in missing.json()["detail"] and "label_codes" in missing.json()["detail"]
    assert get_seg(client, tokens, seg_id, label="spleen").status_code == 200  # only the written labels need codes
    export = client.post(f"/api/v1/datasets/{did}/exports", headers=headers, json={
        "dataset_number": 502, "label_source": "reference", "mask_formats": ["nifti", "dicom-seg"]})
    assert export.status_code == 422 and "lesion" in export.json()["detail"]

    code = {"scheme": "SCT", "code": "52988006", "meaning": "Lesion"}
    wrong = client.patch(f"/api/v1/datasets/{did}", headers=headers, json={"label_codes": {"tumor": code}})
    assert wrong.status_code == 422 and "tumor" in wrong.json()["detail"]
    patched = client.patch(f"/api/v1/datasets/{did}", headers=headers, json={"label_codes": {"lesion": code}})
    assert patched.status_code == 200 and patched.json()["label_codes"] == {"lesion": code}
    response = get_seg(client, tokens, seg_id)
    assert response.status_code == 200, response.text
    segments = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0] for s in read_seg(response.content)
                .SegmentSequence}
    assert list(segments) == ["spleen", "liver", "lesion"]
    assert (segments["lesion"].CodeValue, segments["lesion"].CodeMeaning) == ("52988006", "Lesion")
    assert segments["liver"].CodeValue == "10200004"
    # a reference export: the uploaded reference as a MANUAL SEG with the dataset's own code
    export = client.post(f"/api/v1/datasets/{did}/exports", headers=headers, json={
        "dataset_number": 502, "label_source": "reference", "mask_formats": ["nifti", "dicom-seg"]})
    assert export.status_code == 202, export.text
    run_jobs("cpu")
    done = client.get(f"/api/v1/exports/{export.json()['id']}", headers=headers).json()
    assert done["status"] == "finished", done
    member = f"{done['folder']}/dicom_seg/sm.dcm"
    archive = client.get(f"/api/v1/exports/{done['id']}/archive", headers=headers).content
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        reference_seg = read_seg(tar.extractfile(member).read())  # type: ignore[union-attr]
    assert [s.SegmentLabel for s in reference_seg.SegmentSequence] == ["spleen", "liver", "lesion"]
    assert {s.SegmentAlgorithmType for s in reference_seg.SegmentSequence} == {"MANUAL"}
    assert reference_seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"

    cleared = client.patch(f"/api/v1/datasets/{did}", headers=headers, json={"label_codes": None})
    assert cleared.status_code == 200 and cleared.json()["label_codes"] is None
    assert get_seg(client, tokens, seg_id).status_code == 422


def test_dicom_source_seg_references_the_series(client, tokens, dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    orientation = ("P", "L", "I")
    paths = write_series(CT_DIR / "example_ct_sm.nii.gz", tmp_path / "series", orientation=orientation)
    reference = nib.load(str(CT_DIR / "example_seg.nii.gz"))
    ref_labels, ref_affine = reorient(np.asarray(reference.dataobj), reference.affine, orientation)
    ref_path = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(ref_labels.astype(np.uint8), ref_affine), str(ref_path))
    response = client.post(
        f"/api/v1/datasets/{dataset['id']}/volumes", headers=tokens.headers("researcher"),
        files=[("image", ("series.zip", zip_series(paths), "application/zip")),
               ("reference", ("ref.nii.gz", ref_path.read_bytes(), "application/gzip"))],
        data={"case_id": "d1", "reference_map": json.dumps(TOTALSEG_MAP), "reference_other": "background"},
    )
    assert response.status_code == 201, response.text
    volume = response.json()
    seg_id, mask = finished_segmentation(volume["id"])

    got = get_seg(client, tokens, seg_id)
    assert got.status_code == 200, got.text
    seg = read_seg(got.content)
    check_segments(seg, present(mask))
    np.testing.assert_array_equal(labels_from_seg(got.content, volume["affine"], tuple(volume["shape"])), mask)

    source = [pydicom.dcmread(p) for p in paths]
    sops = {ds.SOPInstanceUID for ds in source}
    first = source[0]
    assert seg.StudyInstanceUID == first.StudyInstanceUID == volume["study_instance_uid"]
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.PatientID == "TEST"
    series = seg.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID == volume["series_instance_uid"]
    assert {item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence} == sops
    # every frame derives from the source slice at its own position
    by_sop = {ds.SOPInstanceUID: ds for ds in source}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        derived = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in by_sop[derived].ImagePositionPatient], atol=1e-4)


def test_export_with_dicom_seg_files(client, tokens, sm_volume, run_jobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    headers = tokens.headers("researcher")
    did = sm_volume["dataset_id"]
    seg_id, mask = finished_segmentation(sm_volume["id"])
    url = f"/api/v1/datasets/{did}/exports"
    body = {"dataset_number": 503, "label_source": "segmentation", "model": "litemedsam"}
    for formats in (["dicom-seg"], ["nifti", "nifti"], ["nifti", "dicom"]):
        assert client.post(url, headers=headers, json={**body, "mask_formats": formats}).status_code == 422
    response = client.post(url, headers=headers, json={**body, "mask_formats": ["nifti", "dicom-seg"]})
    assert response.status_code == 202, response.text
    assert response.json()["params"]["mask_formats"] == ["nifti", "dicom-seg"]
    run_jobs("cpu")
    export = client.get(f"/api/v1/exports/{response.json()['id']}", headers=headers).json()
    assert export["status"] == "finished", export
    folder = export["folder"]
    paths = {f["path"] for f in export["files"]}
    assert {f"{folder}/labelsTr/sm.nii.gz", f"{folder}/imagesTr/sm_0000.nii.gz", f"{folder}/dicom_seg/sm.dcm"} <= paths
    assert export["dataset_json"]["crowdsam"]["mask_formats"] == ["nifti", "dicom-seg"]
    archive = client.get(f"/api/v1/exports/{export['id']}/archive", headers=headers)
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        content = tar.extractfile(f"{folder}/dicom_seg/sm.dcm").read()  # type: ignore[union-attr]
        assert f"{folder}/labelsTr/sm.nii.gz" in tar.getnames()
    seg = read_seg(content)
    check_segments(seg, present(mask))
    image = nib.load(str(CT_DIR / "example_ct_sm.nii.gz"))
    np.testing.assert_array_equal(labels_from_seg(content, image.affine, image.shape), mask)
    # the same synthetic study as the mask endpoint's SEG of this volume
    direct = read_seg(get_seg(client, tokens, seg_id).content)
    assert direct.StudyInstanceUID == seg.StudyInstanceUID
    assert direct.ReferencedSeriesSequence[0].SeriesInstanceUID == seg.ReferencedSeriesSequence[0].SeriesInstanceUID


@pytest.mark.parametrize(("name", "code", "laterality"), [
    ("spleen", "78961009", None), ("kidney_right", "64033007", "right"), ("adrenal_gland_left", "23451007", "left"),
    ("urinary_bladder", "89837001", None), ("small_bowel", "30315005", None), ("inferior_vena_cava", "64131007", None),
])
def test_builtin_codes(name: str, code: str, laterality: str | None) -> None:
    from app.imaging.dicom_seg import BUILTIN_CODES, MissingLabelCodes, resolve_codes

    assert (BUILTIN_CODES[name].scheme, BUILTIN_CODES[name].code, BUILTIN_CODES[name].laterality) == (
        "SCT", code, laterality)
    with pytest.raises(MissingLabelCodes, match="lesion"):
        resolve_codes([name, "lesion"], None)
    override = {name: {"scheme": "99LOCAL", "code": "X1", "meaning": "Local"}}
    assert resolve_codes([name], override)[name].code == "X1"


def test_oblique_flipped_grid_round_trips_and_empty_request_keeps_its_segment() -> None:
    """Pure: a rotated, flipped, anisotropic affine; frames mapped back through their plane positions."""
    from datetime import UTC, datetime

    from app.imaging.dicom_seg import Algorithm, build_segmentation, resolve_codes, synthetic_ct_series

    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, 1.1, -2.5])
    affine[:3, 3] = [12.5, -40.0, 300.0]
    shape = (9, 7, 5)
    rng = np.random.default_rng(0)
    mask = rng.choice([0, 1, 5, 52], size=shape, p=[0.7, 0.1, 0.1, 0.1]).astype(np.uint8)
    values = {"spleen": 1, "liver": 5, "aorta": 52, "kidney_left": 3}
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    source = synthetic_ct_series(affine, shape, seed="v", patient_id="p", study_description="s", created=created)
    content = build_segmentation(mask, values, resolve_codes(["spleen", "liver", "aorta"], None), source,
                                 algorithm=Algorithm(version="1", model="m"), seed="x", created=created)
    seg = read_seg(content)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["spleen", "liver", "aorta"]  # kidney_left absent
    np.testing.assert_array_equal(labels_from_seg(content, affine, shape), mask)
    assert seg.ContentDate == "20260102" and seg.StudyInstanceUID == source[0].StudyInstanceUID

    empty = build_segmentation(np.zeros(shape, np.uint8), {"kidney_left": 3}, resolve_codes(["kidney_left"], None),
                               source, algorithm=Algorithm(version="1", model="m"), seed="y", created=created)
    assert [s.SegmentLabel for s in read_seg(empty).SegmentSequence] == ["kidney_left"]
    assert not labels_from_seg(empty, affine, shape).any()
