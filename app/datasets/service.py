from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth.models import ApiToken, Role
from app.auth.repository import TokenRepository
from app.auth.security import Principal
from app.core.errors import Conflict, Invalid, NotFound
from app.datasets.access import add_member, forget_memberships
from app.datasets.models import Dataset, DatasetMember, MemberRole
from app.datasets.repository import DatasetRepository
from app.datasets.schemas import (
    DatasetCreate,
    DatasetUpdate,
    LabelCodes,
    MemberOut,
    TaskPolicyIn,
    check_label_codes,
)


def create_dataset(session: Session, body: DatasetCreate, creator: Principal) -> Dataset:
    """A new dataset owned by its creator (a researcher; admins need no membership), with its annotators."""
    repo = DatasetRepository(session)
    annotators = [_token(session, name, Role.annotator) for name in dict.fromkeys(body.annotators)]
    if repo.by_name(body.name) is not None:
        raise Conflict(f"a dataset named {body.name!r} already exists")
    dataset = Dataset(
        name=body.name,
        labels=body.labels,
        prompt_classes=body.prompt_classes,
        window_level=body.window.level,
        window_width=body.window.width,
        tasks_only=body.tasks_only,
        label_codes=_codes(body.label_codes),
    )
    set_task_policy(dataset, body.tasks)
    try:
        with session.begin_nested():  # a concurrent request may take the name between check and insert
            repo.add(dataset)
    except IntegrityError as exc:
        raise Conflict(f"a dataset named {body.name!r} already exists") from exc
    creator_token = session.get(ApiToken, creator.token_id)
    for token in ([creator_token] if creator.role is Role.researcher and creator_token else []) + annotators:
        add_member(session, dataset, token)
    return dataset


def set_task_policy(dataset: Dataset, policy: TaskPolicyIn) -> None:
    """Apply the fields given in ``policy`` (null = back to the service's default); 422 if max < min views."""
    for name in policy.model_fields_set:
        setattr(dataset, f"task_{name}", getattr(policy, name))
    mine_min, mine_max = dataset.task_min_views, dataset.task_max_views
    if mine_min is not None and mine_max is not None and mine_max < mine_min:
        raise Invalid(f"tasks.max_views ({mine_max}) must be at least tasks.min_views ({mine_min})")


def update_dataset(session: Session, dataset: Dataset, body: DatasetUpdate) -> Dataset:
    """Change a dataset's settings: its task policy, its label codes (given → replaced, null → cleared)."""
    if body.tasks is not None:
        set_task_policy(dataset, body.tasks)
    if "label_codes" in body.model_fields_set:
        try:
            check_label_codes(body.label_codes, dataset.labels)
        except ValueError as exc:
            raise Invalid(str(exc)) from exc
        dataset.label_codes = _codes(body.label_codes)
    session.flush()
    return dataset


def _codes(codes: LabelCodes | None) -> dict[str, Any] | None:
    return None if codes is None else {name: code.model_dump() for name, code in codes.items()}


def _token(session: Session, name: str, role: Role | None = None) -> ApiToken:
    token = TokenRepository(session).by_name(name)
    if token is None or token.revoked_at is not None:
        raise Invalid(f"no active token named {name!r}")
    if role is not None and Role(token.role) is not role:
        raise Invalid(f"token {name!r} is a {token.role}, not an {role.value}")
    return token


def members(session: Session, dataset: Dataset) -> list[MemberOut]:
    rows = session.execute(
        select(DatasetMember, ApiToken).join(ApiToken, ApiToken.id == DatasetMember.token_id)
        .where(DatasetMember.dataset_id == dataset.id).order_by(ApiToken.name)
    ).all()
    return [_member_out(m, t) for m, t in rows]


def _member_out(member: DatasetMember, token: ApiToken) -> MemberOut:
    return MemberOut.model_validate({"token_id": token.id, "name": token.name, "token_role": str(token.role),
                                     "role": str(member.role), "created_at": member.created_at})


def put_member(session: Session, dataset: Dataset, name: str) -> MemberOut:
    token = _token(session, name)
    member = add_member(session, dataset, token)
    forget_memberships()
    return _member_out(member, token)


def remove_member(session: Session, dataset: Dataset, name: str) -> None:
    token = _token(session, name)
    member = session.get(DatasetMember, (dataset.id, token.id), with_for_update=True)
    if member is None:
        raise NotFound(f"{name!r} is not a member of dataset {dataset.id}")
    if member.role == MemberRole.owner:
        owners = session.scalar(select(func.count()).select_from(DatasetMember).where(
            DatasetMember.dataset_id == dataset.id, DatasetMember.role == MemberRole.owner))
        if owners == 1:
            raise Conflict(f"{name!r} is the last owner of dataset {dataset.id}: add another owner first")
    session.delete(member)
    session.flush()
    forget_memberships()
