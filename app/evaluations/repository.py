from __future__ import annotations

from app.core.repository import Repository
from app.evaluations.models import Evaluation


class EvaluationRepository(Repository[Evaluation]):
    model = Evaluation
    what = "evaluation"
