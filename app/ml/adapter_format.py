"""The adapter artifact: a gzipped tar of a PEFT adapter folder plus a `tuneforge.json` manifest.

The gzip stream stores its blocks uncompressed (level 0): trained float weights do not compress (level 9 saved
7% of a 12 MB delta) and compressing them took half of a job's checkpointing time (0.55 s per 12 MB, against
0.02 s; a `full` delta of SmolLM2 is 540 MB). The archive is an ordinary .tar.gz to every reader."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

MANIFEST = "tuneforge.json"


def pack(folder: Path, archive: Path, manifest: dict[str, Any]) -> tuple[int, str]:
    """Write `archive` from the files in `folder` and the manifest; returns (size, sha256)."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with tarfile.open(archive, "w:gz", compresslevel=0) as tar:
        for item in sorted(folder.iterdir()):
            tar.add(item, arcname=item.name)
    digest = hashlib.sha256()
    with archive.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return archive.stat().st_size, digest.hexdigest()


def unpack(archive: Path, dest: Path) -> Path:
    """Extract into `dest` (replaced atomically); refuses members that would escape it."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(tmp, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


class Downloads(Protocol):
    def download(self, key: str, dest: Path) -> str:
        """The object `key` into `dest`; its sha256 (FileNotFoundError if there is none)."""
        ...


class StoredArtifactUnavailable(Exception):
    """A stored archive that is missing or damaged (its digest is not the one recorded): `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextmanager
def fetched(storage: Downloads, key: str, sha256: str, tmp_dir: Path) -> Iterator[Path]:
    """A stored archive fetched from the object store, checked against its recorded digest and unpacked in a
    temporary folder under `tmp_dir` while the context lasts; StoredArtifactUnavailable if it is missing or
    damaged. (The worker's job that continues from an adapter, Tinker's loaded states and scoring models.)"""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="artifact-", dir=tmp_dir) as tmp:
        archive = Path(tmp) / "artifact.tar.gz"
        try:
            digest = storage.download(key, archive)
        except FileNotFoundError:
            raise StoredArtifactUnavailable("missing") from None
        if digest != sha256:
            raise StoredArtifactUnavailable("damaged (checksum mismatch)")
        yield unpack(archive, Path(tmp) / "artifact")
