"""Model registry: names, families, checkpoint verification by size + sha256 (app/segmentations/registry.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from app.segmentations import registry


def test_registry_lists_every_model_and_litemedsam_is_available(tmp_path: Path) -> None:
    models = registry.list_models(tmp_path)
    assert [m.name for m in models] == list(registry.MODEL_NAMES)
    by_name = {m.name: m for m in models}
    lite = by_name["litemedsam"]
    assert lite.available and lite.reason is None and lite.family == "litemedsam"
    assert lite.checkpoint is not None and lite.checkpoint.endswith("lite_medsam.pth")
    assert {by_name[n].family for n in ("sam_vit_b", "sam_vit_l", "sam_vit_h")} == {"sam"}
    assert by_name["medsam"].family == "medsam"
    for name in ("sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam"):
        info = by_name[name]
        assert not info.available
        assert "not found" in (info.reason or "") and registry.SPECS[name].checkpoint.filename in info.reason


def test_unknown_model_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        registry.model_info("sam_vit_x")


def test_wrong_size_checkpoint_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "sam_vit_h_4b8939.pth").write_bytes(b"not a checkpoint")
    info = registry.model_info("sam_vit_h", tmp_path)
    assert not info.available
    assert "16 bytes, expected 2564550879" in (info.reason or "")
    with pytest.raises(registry.ModelUnavailable, match="sam_vit_h is unavailable"):
        registry.require("sam_vit_h", tmp_path)


def test_right_size_wrong_sha256_is_unavailable(tmp_path: Path) -> None:
    spec = registry.SPECS["sam_vit_b"].checkpoint
    assert spec is not None
    with (tmp_path / spec.filename).open("wb") as handle:  # sparse file of exactly the published size
        handle.truncate(spec.size)
    info = registry.model_info("sam_vit_b", tmp_path)
    assert not info.available and "sha256" in (info.reason or "") and spec.sha256 in (info.reason or "")


def test_verify_checkpoint_accepts_the_expected_file(tmp_path: Path) -> None:
    payload = b"weights" * 1000
    path = tmp_path / "w.pth"
    path.write_bytes(payload)
    good = registry.CheckpointSpec("w.pth", len(payload), hashlib.sha256(payload).hexdigest())
    assert registry.verify_checkpoint(path, good) is None
    bad = registry.CheckpointSpec("w.pth", len(payload), "0" * 64)
    assert "expected " + "0" * 64 in (registry.verify_checkpoint(path, bad) or "")
    path.write_bytes(payload[:-1] + b"X")  # same size, new content: the memo is keyed by mtime too
    assert registry.verify_checkpoint(path, good) is not None


def test_loading_an_unavailable_model_raises_model_unavailable(tmp_path: Path) -> None:
    from workers.sam.models import load_model

    with pytest.raises(registry.ModelUnavailable, match=r"medsam_vit_b\.pth not found"):
        load_model("medsam", checkpoint_dir=tmp_path)


def test_registry_does_not_import_torch() -> None:
    code = ("import sys; from app.segmentations import registry; registry.list_models(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"
