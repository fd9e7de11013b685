from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.evaluations.models import Evaluation


class EvaluationRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, evaluation_id: int) -> Evaluation:
        row = self.session.get(Evaluation, evaluation_id)
        if row is None:
            raise NotFound(f"evaluation {evaluation_id} not found")
        return row

    def add(self, evaluation: Evaluation) -> Evaluation:
        self.session.add(evaluation)
        self.session.flush()
        return evaluation
