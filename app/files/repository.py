"""Queries on files; every one is scoped to a tenant."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import locked
from app.core.models import ACTIVE_STATUSES, File, Job
from app.core.pagination import newest_first


def get_file(session: Session, *, tenant_id: str, file_id: str, for_update: bool = False) -> File | None:
    """`for_update` locks the row (PostgreSQL) so that a job cannot start using it while it is deleted.

    A no-key lock (FOR NO KEY UPDATE): it excludes the other job creations and deletions of the file, but not a
    row that merely references it (its token counts, stored in a transaction of their own while it is held).
    """
    query = select(File).where(File.id == file_id, File.tenant_id == tenant_id, File.deleted_at.is_(None))
    return session.scalar(locked(session, query, key_share=True) if for_update else query)


def list_files(session: Session, *, tenant_id: str, limit: int, after: File | None) -> tuple[list[File], bool]:
    query = select(File).where(File.tenant_id == tenant_id, File.deleted_at.is_(None))
    return newest_first(session, query, File, limit=limit, after=after)


def active_job_using(session: Session, *, file_id: str) -> str | None:
    """The id of a job that has not ended and trains or validates on the file, if any."""
    return session.scalar(
        select(Job.id)
        .where(
            (Job.training_file_id == file_id) | (Job.validation_file_id == file_id),
            Job.status.in_(ACTIVE_STATUSES),
        )
        .limit(1)
    )
