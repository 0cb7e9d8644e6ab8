"""Queries on files; every one is scoped to a tenant."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.models import File


def get_file(session: Session, *, tenant_id: str, file_id: str) -> File | None:
    return session.scalar(
        select(File).where(File.id == file_id, File.tenant_id == tenant_id, File.deleted_at.is_(None))
    )


def list_files(session: Session, *, tenant_id: str) -> list[File]:
    return list(
        session.scalars(
            select(File)
            .where(File.tenant_id == tenant_id, File.deleted_at.is_(None))
            .order_by(File.created_at.desc(), File.id.desc())
        )
    )
