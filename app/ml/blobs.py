"""What the library needs of an object store: a small protocol, which `app.core.storage.ObjectStorage` (and a
folder, or anything else with these methods) satisfies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class BlobStore(Protocol):
    """Objects by key (`datasets/…`, `adapters/…`, `models/blobs/sha256/…`)."""

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """The object's bytes, in chunks; FileNotFoundError if there is none."""
        ...

    def download(self, key: str, dest: Path) -> str:
        """Copy the object to a local file; returns its sha256. FileNotFoundError if there is none."""
        ...
