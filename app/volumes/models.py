from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, String, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, TimestampMixin


class Volume(TimestampMixin, Base):
    """A CT volume stored exactly as uploaded, plus its canonical (RAS+) slice cache."""

    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("dataset_id", "case_id", name="uq_volumes_dataset_case"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    case_id: Mapped[str] = mapped_column(String(200))
    split: Mapped[str] = mapped_column(String(10))
    image_key: Mapped[str] = mapped_column(String(500))
    canonical_key: Mapped[str] = mapped_column(String(500))
    reference_key: Mapped[str | None] = mapped_column(String(500), default=None)
    shape: Mapped[list[int]] = mapped_column(JSONB)
    canonical_shape: Mapped[list[int]] = mapped_column(JSONB)
    spacing: Mapped[list[float]] = mapped_column(JSONB)
    affine: Mapped[list[list[float]]] = mapped_column(JSONB)
    orientation: Mapped[str] = mapped_column(String(3))
    dtype: Mapped[str] = mapped_column(String(20))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    reference_labels: Mapped[list[str] | None] = mapped_column(JSONB, default=None)
    # Where the image came from: 'nifti' as uploaded, or 'dicom' (a series converted to NIfTI on upload).
    source_format: Mapped[str] = mapped_column(String(10), default="nifti", server_default="nifti")
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    dicom_key: Mapped[str | None] = mapped_column(String(500), default=None)  # the series' headers (zip)

    @property
    def n_slices(self) -> int:
        return int(self.canonical_shape[2])

    @property
    def has_reference(self) -> bool:
        return self.reference_key is not None
