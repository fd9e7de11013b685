from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.auth.models import Role

MAX_TOKEN_DAYS = 3650


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Role
    expires_in_days: float | None = Field(default=None, gt=0, le=MAX_TOKEN_DAYS,
                                          description="the token stops working this many days from now")
    expires_at: datetime | None = Field(default=None, description="the token stops working at this time "
                                                                  "(ISO 8601; without an offset it is UTC)")

    @model_validator(mode="after")
    def _one_expiry(self) -> Self:
        if self.expires_in_days is not None and self.expires_at is not None:
            raise ValueError("give expires_in_days or expires_at, not both")
        if self.expires_at is not None:
            if self.expires_at.tzinfo is None:
                self.expires_at = self.expires_at.replace(tzinfo=UTC)
            if self.expires_at <= datetime.now(UTC):
                raise ValueError("expires_at must be in the future")
            if self.expires_at > datetime.now(UTC) + timedelta(days=MAX_TOKEN_DAYS):
                raise ValueError(f"expires_at must be within {MAX_TOKEN_DAYS} days")
        return self

    def expiry(self) -> datetime | None:
        """When the token stops working (None = never)."""
        if self.expires_in_days is not None:
            return datetime.now(UTC) + timedelta(days=self.expires_in_days)
        return self.expires_at


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: Role
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None = Field(description="the token is refused (401) from then on; null = never")
    last_used_at: datetime | None = Field(description="last accepted request, to the minute; null = never used")


class TokenCreated(TokenOut):
    token: str = Field(description="The secret; shown once, never stored")


class Me(BaseModel):
    id: int
    name: str
    role: Role
