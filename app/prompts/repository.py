"""All SQL of prompts and slice views: bulk idempotent inserts, filtered listing, coverage counts."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, distinct, func, select, text

from app.core.errors import Conflict
from app.core.repository import Repository
from app.prompts.models import Prompt, SliceView
from app.volumes.models import Volume

INSERT_CHUNK = 10_000
_PROMPT_ARRAYS = [
    ("volume_id", "integer"), ("slice_index", "integer"), ("label", "text"), ("annotator", "text"),
    ("token_id", "integer"), ("kind", "text"), ("x0", "float8"), ("y0", "float8"), ("x1", "float8"),
    ("y1", "float8"), ("positive", "boolean"), ("source", "text"), ("client_id", "uuid"),
]
_INSERT_PROMPTS = text(
    f"INSERT INTO prompts ({', '.join(n for n, _ in _PROMPT_ARRAYS)}) "
    f"SELECT * FROM unnest({', '.join(f'CAST(:{n} AS {t}[])' for n, t in _PROMPT_ARRAYS)}) "
    "ON CONFLICT ON CONSTRAINT uq_prompts_annotator_client_id DO NOTHING "
    "RETURNING id, annotator, client_id"
)
_FIND_PROMPTS = text(
    "SELECT p.id, p.annotator, p.client_id, p.volume_id FROM prompts p "
    "JOIN unnest(CAST(:annotator AS text[]), CAST(:client_id AS uuid[])) AS k(annotator, client_id) "
    "ON p.annotator = k.annotator AND p.client_id = k.client_id"
)
_INSERT_VIEWS = text(
    "INSERT INTO slice_views (volume_id, slice_index, annotator, source) "
    "SELECT :volume_id, k, a, :source FROM unnest(CAST(:slice_index AS integer[]), CAST(:annotator AS text[])) "
    "AS v(k, a) ON CONFLICT ON CONSTRAINT uq_slice_views_volume_slice_annotator DO NOTHING"
)

# Per (volume, slice, label) of some slices: the slice's viewers, how many of them marked the label (a box or
# a positive point) and the mean pairwise IoU of their boxes, each annotator's boxes of the label taken as one
# (their bounding box). Prompts only, no SAM. ``wanted`` is either the given slices or every slice of a dataset
# seen by two or more annotators (then in the statement's own snapshot).
_WANTED_GIVEN = (
    "wanted AS (SELECT * FROM unnest(CAST(:volume_id AS integer[]), CAST(:slice_index AS integer[])) "
    "  AS w(volume_id, slice_index)), "
    "viewers AS (SELECT sv.volume_id, sv.slice_index, count(*) AS n FROM slice_views sv "
    "  JOIN wanted w ON w.volume_id = sv.volume_id AND w.slice_index = sv.slice_index "
    "  GROUP BY sv.volume_id, sv.slice_index), "
)
_WANTED_DATASET = (
    "viewers AS (SELECT sv.volume_id, sv.slice_index, count(*) AS n FROM slice_views sv "
    "  JOIN volumes v ON v.id = sv.volume_id WHERE v.dataset_id = :dataset_id "
    "  GROUP BY sv.volume_id, sv.slice_index HAVING count(*) >= 2), "
)
_VOTES = (
    "drawn AS (SELECT p.volume_id, p.slice_index, p.label, p.annotator, "
    "  min(p.x0) FILTER (WHERE p.kind = 'box') AS x0, min(p.y0) FILTER (WHERE p.kind = 'box') AS y0, "
    "  max(p.x1) FILTER (WHERE p.kind = 'box') AS x1, max(p.y1) FILTER (WHERE p.kind = 'box') AS y1 "
    "  FROM prompts p JOIN viewers w ON w.volume_id = p.volume_id AND w.slice_index = p.slice_index "
    "  WHERE p.kind = 'box' OR p.positive GROUP BY p.volume_id, p.slice_index, p.label, p.annotator), "
    "pairs AS (SELECT a.volume_id, a.slice_index, a.label, avg("
    "  greatest(0, least(a.x1, b.x1) - greatest(a.x0, b.x0)) * greatest(0, least(a.y1, b.y1) - greatest(a.y0, b.y0)) "
    "  / nullif((a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - greatest(0, least(a.x1, b.x1) "
    "  - greatest(a.x0, b.x0)) * greatest(0, least(a.y1, b.y1) - greatest(a.y0, b.y0)), 0)) AS iou "
    "  FROM drawn a JOIN drawn b ON a.volume_id = b.volume_id AND a.slice_index = b.slice_index "
    "  AND a.label = b.label AND a.annotator COLLATE \"C\" < b.annotator COLLATE \"C\" "
    "  WHERE a.x0 IS NOT NULL AND b.x0 IS NOT NULL GROUP BY a.volume_id, a.slice_index, a.label) "
    "SELECT w.volume_id, w.slice_index, w.n, d.label, count(*) AS drew, min(q.iou) AS iou FROM drawn d "
    "JOIN viewers w ON w.volume_id = d.volume_id AND w.slice_index = d.slice_index "
    "LEFT JOIN pairs q ON q.volume_id = d.volume_id AND q.slice_index = d.slice_index AND q.label = d.label "
    "GROUP BY w.volume_id, w.slice_index, w.n, d.label"
)
_SLICE_VOTES = text("WITH " + _WANTED_GIVEN + _VOTES)
_DATASET_VOTES = text("WITH " + _WANTED_DATASET + _VOTES)


@dataclass(frozen=True)
class LabelVotes:
    """What the annotators of one slice said about one label."""

    drew: int  # annotators with a box or a positive point for it
    iou: float | None  # mean pairwise IoU of their boxes (None: fewer than two drew a box)


@dataclass(frozen=True)
class PromptFilter:
    slice: int | None = None
    label: str | None = None
    annotator: str | None = None
    kind: str | None = None


@dataclass
class InsertOutcome:
    ids: list[int]  # one per row, in input order
    duplicates: list[int]  # ids that existed before this call


class PromptRepository(Repository[Prompt]):
    model = Prompt
    what = "prompt"

    # --- writes -------------------------------------------------------------------------
    def insert_many(self, rows: list[dict[str, Any]]) -> InsertOutcome:
        """Insert prompt rows (each with ``annotator`` and ``client_id``), skipping existing client_ids.

        One ``INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING RETURNING`` per chunk:
        a handful of array parameters instead of thousands of placeholders. Rows go in sorted by
        (annotator, client_id) so concurrent requests take unique-index locks in one order (no
        deadlocks); a retried request gets the ids stored the first time, listed as duplicates.
        """
        if not rows:
            return InsertOutcome([], [])
        ordered = sorted(rows, key=lambda r: (r["annotator"], str(r["client_id"])))
        new: dict[tuple[str, uuid.UUID], int] = {}
        for start in range(0, len(ordered), INSERT_CHUNK):
            chunk = ordered[start:start + INSERT_CHUNK]
            params = {name: [r[name] for r in chunk] for name, _ in _PROMPT_ARRAYS}
            for row in self.session.execute(_INSERT_PROMPTS, params):
                new[(row.annotator, row.client_id)] = row.id
        missing = [(r["annotator"], r["client_id"]) for r in rows if (r["annotator"], r["client_id"]) not in new]
        existing: dict[tuple[str, uuid.UUID], tuple[int, int]] = {}
        for start in range(0, len(missing), INSERT_CHUNK):
            keys = missing[start:start + INSERT_CHUNK]
            found = self.session.execute(
                _FIND_PROMPTS, {"annotator": [a for a, _ in keys], "client_id": [c for _, c in keys]}
            )
            for row in found:
                existing[(row.annotator, row.client_id)] = (row.id, row.volume_id)
        ids: list[int] = []
        duplicates: list[int] = []
        for index, r in enumerate(rows):
            key = (r["annotator"], r["client_id"])
            if key in new:
                ids.append(new[key])
                continue
            if key not in existing:  # deleted between the insert and the lookup: vanishingly rare
                raise Conflict(f"item {index}: client_id {r['client_id']} is being changed concurrently; retry")
            prompt_id, volume_id = existing[key]
            if volume_id != r["volume_id"]:
                raise Conflict(
                    f"item {index}: client_id {r['client_id']} was already used by annotator "
                    f"{r['annotator']!r} on volume {volume_id}"
                )
            ids.append(prompt_id)
            duplicates.append(prompt_id)
        return InsertOutcome(ids, duplicates)

    def seen_by(self, volume_id: int, annotator: str, slices: Iterable[int]) -> set[int]:
        """The slices of ``slices`` that ``annotator`` has already seen (worked on)."""
        stmt = select(SliceView.slice_index).where(
            SliceView.volume_id == volume_id, SliceView.annotator == annotator,
            SliceView.slice_index.in_(sorted(set(slices))))
        return {int(k) for k in self.session.scalars(stmt)}

    def mark_seen(self, volume_id: int, views: Iterable[tuple[int, str]], source: str) -> None:
        """Record (slice, annotator) views of a volume; existing views are kept as they are."""
        ordered = sorted(set(views), key=lambda v: (v[1], v[0]))
        for start in range(0, len(ordered), INSERT_CHUNK):
            chunk = ordered[start:start + INSERT_CHUNK]
            self.session.execute(_INSERT_VIEWS, {
                "volume_id": volume_id, "source": source,
                "slice_index": [k for k, _ in chunk], "annotator": [a for _, a in chunk],
            })

    # --- reads --------------------------------------------------------------------------
    def _where(self, volume_id: int, f: PromptFilter) -> list[Any]:
        clauses: list[Any] = [Prompt.volume_id == volume_id]
        if f.slice is not None:
            clauses.append(Prompt.slice_index == f.slice)
        if f.label is not None:
            clauses.append(Prompt.label == f.label)
        if f.annotator is not None:
            clauses.append(Prompt.annotator == f.annotator)
        if f.kind is not None:
            clauses.append(Prompt.kind == f.kind)
        return clauses

    def page(self, volume_id: int, f: PromptFilter, limit: int, offset: int) -> tuple[Sequence[Prompt], int]:
        where = self._where(volume_id, f)
        total = int(self.session.scalar(select(func.count()).select_from(Prompt).where(*where)) or 0)
        items = self.session.scalars(select(Prompt).where(*where).order_by(Prompt.id).limit(limit).offset(offset))
        return items.all(), total

    def boxes(
        self, volume_id: int, annotator: str | None = None
    ) -> Sequence[Row[str, int, str, float, float, float | None, float | None]]:
        """(annotator, slice, label, x0, y0, x1, y1) of a volume's boxes, ordered by slice then id."""
        stmt = select(
            Prompt.annotator, Prompt.slice_index, Prompt.label, Prompt.x0, Prompt.y0, Prompt.x1, Prompt.y1
        ).where(Prompt.volume_id == volume_id, Prompt.kind == "box")
        if annotator is not None:
            stmt = stmt.where(Prompt.annotator == annotator)
        return self.session.execute(stmt.order_by(Prompt.slice_index, Prompt.id)).all()

    def views(self, volume_id: int, annotator: str | None = None) -> Sequence[Row[str, int]]:
        """(annotator, slice) pairs seen on a volume."""
        stmt = select(SliceView.annotator, SliceView.slice_index).where(SliceView.volume_id == volume_id)
        if annotator is not None:
            stmt = stmt.where(SliceView.annotator == annotator)
        return self.session.execute(stmt.order_by(SliceView.annotator, SliceView.slice_index)).all()

    def prompt_counts(self, volume_id: int) -> Sequence[Row[int, str, int, int]]:
        """(slice, label, distinct annotators, prompts) of a volume."""
        return self.session.execute(
            select(
                Prompt.slice_index,
                Prompt.label,
                func.count(distinct(Prompt.annotator)).label("annotators"),
                func.count().label("prompts"),
            )
            .where(Prompt.volume_id == volume_id)
            .group_by(Prompt.slice_index, Prompt.label)
        ).all()

    def view_counts(self, volume_id: int) -> Sequence[Row[int, int]]:
        """(slice, distinct annotators who saw it) of a volume."""
        return self.session.execute(
            select(SliceView.slice_index, func.count(distinct(SliceView.annotator)).label("seen_by"))
            .where(SliceView.volume_id == volume_id)
            .group_by(SliceView.slice_index)
        ).all()

    def dataset_view_counts(self, dataset_id: int) -> dict[tuple[int, int], int]:
        """(volume, slice) → distinct annotators who saw it, over a dataset."""
        rows = self.session.execute(
            select(SliceView.volume_id, SliceView.slice_index, func.count(distinct(SliceView.annotator)))
            .join(Volume, Volume.id == SliceView.volume_id)
            .where(Volume.dataset_id == dataset_id)
            .group_by(SliceView.volume_id, SliceView.slice_index)
        )
        return {(v, k): int(n) for v, k, n in rows}

    def dataset_has_answers(self, dataset_id: int) -> bool:
        """Whether anyone has seen a slice of the dataset yet (its annotation has started)."""
        query = select(SliceView.volume_id).join(Volume, Volume.id == SliceView.volume_id) \
            .where(Volume.dataset_id == dataset_id).limit(1)
        return self.session.execute(query).first() is not None

    def dataset_seen_by(self, dataset_id: int, annotator: str) -> set[tuple[int, int]]:
        """(volume, slice) pairs of a dataset this annotator has seen."""
        rows = self.session.execute(
            select(SliceView.volume_id, SliceView.slice_index)
            .join(Volume, Volume.id == SliceView.volume_id)
            .where(Volume.dataset_id == dataset_id, SliceView.annotator == annotator)
        )
        return {(v, k) for v, k in rows}

    def slice_votes(self, slices: Sequence[tuple[int, int]] | None = None, dataset_id: int | None = None,
                    ) -> dict[tuple[int, int], tuple[int, dict[str, LabelVotes]]]:
        """(volume, slice) → (annotators who saw it, label → :class:`LabelVotes`) for the given slices, or for
        every slice of ``dataset_id`` seen by two or more; slices where nobody marked anything are left out."""
        out: dict[tuple[int, int], tuple[int, dict[str, LabelVotes]]] = {}
        if slices is not None:
            if not slices:
                return out
            rows = self.session.execute(_SLICE_VOTES, {
                "volume_id": [v for v, _ in slices], "slice_index": [k for _, k in slices]})
        else:
            rows = self.session.execute(_DATASET_VOTES, {"dataset_id": dataset_id})
        for v, k, n, label, drew, iou in rows:
            out.setdefault((v, k), (int(n), {}))[1][label] = LabelVotes(int(drew), None if iou is None else float(iou))
        return out

    def client_ids(self, volume_id: int, annotators: Sequence[str]) -> set[uuid.UUID]:
        """Client ids of these annotators' prompts on a volume."""
        rows = self.session.scalars(
            select(Prompt.client_id).where(Prompt.volume_id == volume_id, Prompt.annotator.in_(annotators))
        )
        return {c for c in rows if c is not None}
