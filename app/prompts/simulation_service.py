"""Simulated crowds stored as prompts: :func:`app.prompts.simulate.simulate_crowd` on a volume's reference."""

from __future__ import annotations

import uuid
from collections import Counter

from sqlalchemy.orm import Session

from app.auth.security import Principal
from app.core.errors import Conflict, Invalid
from app.core.storage import Storage
from app.datasets.models import Dataset
from app.prompts.reference import canonical_reference
from app.prompts.repository import PromptRepository
from app.prompts.schemas import SimulateRequest, SimulateResult
from app.prompts.service import BoxRow, store_boxes
from app.prompts.simulate import simulate_crowd
from app.volumes.models import Volume

CLIENT_ID_NAMESPACE = uuid.UUID("0b6f0f43-8a0e-4d0b-9f0e-3c51a8f1d2a7")
ORIGINAL_FIELDS = {"annotators", "jitter", "coverage", "miss_rate", "seed", "labels", "per_component",
                   "min_component_pixels"}


def annotator_name(seed: int, index: int) -> str:
    return f"sim-{seed}-{index}"


def client_id_params(req: SimulateRequest) -> str:
    """The request's parameters as they enter its client ids (every field but ``annotators``, so a larger
    crowd with the same seed repeats the smaller one's prompts). Options added later are left out while
    they have their defaults, so a request keeps the client ids it had before they existed."""
    later = set(SimulateRequest.model_fields) - ORIGINAL_FIELDS
    at_default = {name for name in later if getattr(req, name) == SimulateRequest.model_fields[name].default}
    return req.model_dump_json(exclude={"annotators"} | at_default)


def simulate_for_volume(session: Session, storage: Storage, volume: Volume, dataset: Dataset,
                        req: SimulateRequest, who: Principal) -> SimulateResult:
    """Simulate ``req.annotators`` annotators from the reference and store their boxes and views.

    Repeating the same request is idempotent (same client ids → duplicates); the same seed with
    other parameters is refused (409) rather than mixed into the earlier crowd.
    """
    if volume.reference_key is None:
        raise Invalid(f"volume {volume.id} has no reference label map to simulate from")
    present = volume.reference_labels or []
    labels = req.labels if req.labels is not None else present
    unknown = [name for name in labels if name not in dataset.labels]
    if unknown:
        raise Invalid(f"labels {unknown} are not labels of dataset {dataset.id}")
    if not labels:
        raise Invalid("no labels to simulate (the reference holds none of the dataset's labels)")
    reference = canonical_reference(storage, volume)
    sim = simulate_crowd(
        reference, {name: dataset.labels[name] for name in labels}, annotators=req.annotators,
        jitter=req.jitter, coverage=req.coverage, miss_rate=req.miss_rate, seed=req.seed,
        per_component=req.per_component, min_component_pixels=req.min_component_pixels,
        organ_free_slices=req.organ_free_slices, false_positive_rate=req.false_positive_rate,
        careless=req.careless, careless_jitter=req.careless_jitter, careless_miss_rate=req.careless_miss_rate,
        careless_false_positive_rate=req.careless_false_positive_rate, skill_spread=req.skill_spread,
    )
    params = client_id_params(req)
    names = [annotator_name(req.seed, i) for i in range(req.annotators)]
    rows = [
        BoxRow(names[b.annotator], b.k, b.label, b.box,
               uuid.uuid5(CLIENT_ID_NAMESPACE, f"{volume.id}:{names[b.annotator]}:{params}:{b.k}:{b.label}:{b.part}"))
        for b in sim.boxes
    ]
    existing = PromptRepository(session).client_ids(volume.id, names)
    clash = existing - {r.client_id for r in rows}
    if clash:
        raise Conflict(f"simulated annotators {names} already hold other prompts on volume {volume.id} "
                       f"(same seed, other parameters?): use another seed or delete those prompts")
    seen = {(k, names[i]) for i, slices in sim.seen.items() for k in slices}
    outcome = store_boxes(session, volume, rows, seen, "simulated", who.token_id)
    return SimulateResult(
        annotators=names, careless=[names[i] for i in sim.careless], boxes=len(rows),
        false_positives=sum(b.false_positive for b in sim.boxes), stored=len(outcome.ids) - len(outcome.duplicates),
        duplicates=len(outcome.duplicates), seen_slices=len(seen),
        per_label=dict(sorted(Counter(r.label for r in rows).items())),
        per_annotator={name: sum(1 for r in rows if r.annotator == name) for name in names},
    )
