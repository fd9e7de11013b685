"""Every ORM model, imported once so metadata (Alembic, tests) sees the whole schema."""

from app.auth.models import ApiToken, IdempotencyKey, Role
from app.core.db import Base
from app.datasets.models import Dataset, DatasetMember
from app.evaluations.models import Evaluation
from app.exports.models import Export
from app.prompts.models import Prompt, SliceView
from app.segmentations.models import Segmentation
from app.trainings.models import Training
from app.volumes.models import Volume

__all__ = [
    "ApiToken", "Base", "Dataset", "DatasetMember", "Evaluation", "Export", "IdempotencyKey", "Prompt", "Role",
    "Segmentation", "SliceView", "Training", "Volume",
]
