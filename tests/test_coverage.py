"""Coverage: per slice and label, distinct annotators and prompts; per slice, who saw it."""

from __future__ import annotations


def test_coverage_counts(client, tokens, sm_volume):
    vid = sm_volume["id"]
    a, b = tokens.headers("annotator"), tokens.headers("annotator2")
    box = [1, 1, 9, 9]
    client.post(f"/api/v1/volumes/{vid}/prompts", json={
        "boxes": [{"slice": 3, "label": "liver", "box": box}, {"slice": 3, "label": "liver", "box": [2, 2, 8, 8]},
                  {"slice": 3, "label": "spleen", "box": box}],
        "points": [{"slice": 4, "label": "aorta", "point": [5, 5]}], "seen": [7]}, headers=a)
    client.post(f"/api/v1/volumes/{vid}/prompts", json={
        "boxes": [{"slice": 3, "label": "liver", "box": box}], "seen": [7, 9]}, headers=b)
    r = client.get(f"/api/v1/volumes/{vid}/coverage", headers=a)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "volume_id": vid,
        "n_slices": 30,
        "slices": [
            {"slice": 3, "seen_by": 2, "labels": {"liver": {"annotators": 2, "prompts": 3},
                                                  "spleen": {"annotators": 1, "prompts": 1}}},
            {"slice": 4, "seen_by": 1, "labels": {"aorta": {"annotators": 1, "prompts": 1}}},
            {"slice": 7, "seen_by": 2, "labels": {}},
            {"slice": 9, "seen_by": 1, "labels": {}},
        ],
    }


def test_coverage_of_empty_and_unknown_volume(client, tokens, sm_volume):
    r = client.get(f"/api/v1/volumes/{sm_volume['id']}/coverage", headers=tokens.headers("annotator"))
    assert r.json() == {"volume_id": sm_volume["id"], "n_slices": 30, "slices": []}
    assert client.get("/api/v1/volumes/999/coverage", headers=tokens.headers("annotator")).status_code == 404
    assert client.get(f"/api/v1/volumes/{sm_volume['id']}/coverage").status_code == 401
