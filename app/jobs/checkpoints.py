"""A job's checkpoint rows and their objects: recorded by the attempt that runs the job, pruned to the latest
`keep_checkpoints`, their training states dropped when the job ends (or set aside when one proves unusable: the
checkpoint stays).

A checkpoint is two objects under `checkpoints/<tenant>/<job>/<checkpoint id>/`: `artifact.tar.gz`, the artifact
as trained up to that step (served and downloaded by the checkpoint's id like an adapter), and `state.pt`, the
recipe's whole state that a resumed attempt continues from.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import after_commit
from app.core.models import Checkpoint
from app.core.storage import ObjectStorage
from app.jobs import repository

log = logging.getLogger(__name__)


def checkpoint_prefix(tenant_id: str, job_id: str, checkpoint_id: str) -> str:
    return f"checkpoints/{tenant_id}/{job_id}/{checkpoint_id}"


def record(session: Session, row: Checkpoint, *, keep: int) -> list[Checkpoint]:
    """Insert the row (the caller holds the job, `state.owned`); returns the job's rows past the latest `keep`,
    deleted (their objects are the caller's to delete). A checkpoint whose training state was set aside is neither
    counted nor pruned: its artifact stays, and it does not crowd out the checkpoints a resumed run saves."""
    session.add(row)
    session.flush()
    pruned = [kept for kept in repository.list_checkpoints(session, job_id=row.job_id) if kept.state_key][keep:]
    for old in pruned:
        session.delete(old)
    return pruned


def pruned_bytes(session: Session, *, job_id: str, keep: int) -> int:
    """Bytes that recording one more checkpoint of the job frees: those of the checkpoints `record` would prune."""
    usable = [kept for kept in repository.list_checkpoints(session, job_id=job_id) if kept.state_key]
    return sum(old.size_bytes + old.state_size_bytes for old in usable[keep - 1 :])


def set_aside_state(session: Session, storage: ObjectStorage, *, checkpoint_id: str) -> None:
    """The checkpoint's training state proved unusable (missing, or not a state): nothing will resume from it, and
    its object is deleted once the transaction commits. The checkpoint itself, its artifact, stays: listed, served
    and downloadable."""
    row = session.get(Checkpoint, checkpoint_id, with_for_update=True)
    if row is None or not row.state_key:
        return
    key = row.state_key
    row.state_key, row.state_size_bytes = "", 0
    after_commit(session, lambda: delete_object(storage, key, checkpoint_id))


def drop_training_states(session: Session, storage: ObjectStorage, *, job_id: str) -> None:
    """The job has ended: nothing will resume from its checkpoints, so their training states (weights, optimizer,
    RNG: the larger part) go; the artifacts stay, to serve and download. The objects are deleted once the
    transaction commits (not before: a rolled-back end leaves the job able to resume)."""
    keys = []
    for row in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.state_key != "")):
        keys.append((row.state_key, row.id))
        row.state_key, row.state_size_bytes = "", 0

    def delete() -> None:
        for key, checkpoint_id in keys:
            delete_object(storage, key, checkpoint_id)

    if keys:
        after_commit(session, delete)


def delete_objects(storage: ObjectStorage, row: Checkpoint) -> None:
    """The checkpoint's artifact and training state, deleted from the object store."""
    for key in (row.storage_key, row.state_key):
        if key:
            delete_object(storage, key, row.id)


def delete_object(storage: ObjectStorage, key: str, checkpoint_id: str) -> None:
    try:
        storage.delete(key)
    except Exception:  # an object left behind costs storage, not correctness
        log.warning("could not delete %s of checkpoint %s", key, checkpoint_id)
