"""Queries for training rows."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from app.core.pagination import keyset
from app.core.repository import Repository
from app.evaluations.models import Evaluation
from app.jobs.states import JobStatus
from app.jobs.submit import ACTIVE
from app.trainings.models import Training


class TrainingRepository(Repository[Training]):
    model = Training
    what = "training"

    def page_for_dataset(self, dataset_id: int, after: int | None, limit: int) -> Sequence[Training]:
        """A dataset's trainings, newest (highest id) first, after ``after`` (``limit`` + 1 rows)."""
        stmt = select(Training).where(Training.dataset_id == dataset_id)
        return self.session.scalars(keyset(stmt, Training.id, after, limit, descending=True)).all()

    def active_evaluation(self, training: Training) -> int | None:
        """The id of a queued or running evaluation that reads the training's predictions, if any."""
        uses = {"source": "training", "training_id": training.id}
        return self.session.scalar(
            select(Evaluation.id)
            .where(Evaluation.status.in_(ACTIVE), Evaluation.params.contains(uses))
            .order_by(Evaluation.id)
            .limit(1)
        )

    def newest_finished_evaluation(self, training: Training) -> Evaluation | None:
        """The training's newest finished evaluation (source ``training``), or None."""
        return self.session.scalar(
            select(Evaluation)
            .where(
                Evaluation.dataset_id == training.dataset_id,
                Evaluation.status == JobStatus.finished,
                Evaluation.params["source"].astext == "training",
                Evaluation.params["training_id"].as_integer() == training.id,
            )
            .order_by(Evaluation.finished_at.desc().nulls_last(), Evaluation.id.desc())
            .limit(1)
        )
