"""Object storage over obstore: one API for a local folder, S3-compatible stores, GCS and Azure."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import obstore
import obstore.exceptions
from obstore.store import LocalStore, from_url

from app.core.db import after_commit
from app.core.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
# What a request to the object store raises when the store fails or refuses it (a missing object raises
# FileNotFoundError instead).
StoreError = obstore.exceptions.BaseError
# Listed by `ping`; nothing is ever stored under it.
PROBE_PREFIX = ".readiness-probe"
# A probe gives up after this, without retries (a transfer retries with back-off for up to three minutes).
PROBE_TIMEOUT = timedelta(seconds=2)


class ObjectStorage:
    """Keys are relative paths such as `datasets/<tenant>/<file id>.jsonl`."""

    def __init__(self, store: Any, url: str, probe_store: Any = None) -> None:
        self._store = store
        self._probe_store = probe_store if probe_store is not None else store  # same store, bounded requests
        self.url = url

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStorage:
        url = settings.storage
        parsed = urlparse(url)
        if parsed.scheme == "file":
            root = Path(unquote(parsed.path))  # a data dir named "a b+c" is file:///a%20b%2Bc
            root.mkdir(parents=True, exist_ok=True)
            return cls(LocalStore(prefix=root), url)
        config: dict[str, str] = {}
        client_options: dict[str, Any] = {}
        if parsed.scheme in ("s3", "s3a"):
            if settings.s3_endpoint_url:
                config["endpoint"] = settings.s3_endpoint_url
                if settings.s3_endpoint_url.startswith("http://"):
                    client_options["allow_http"] = True
            if settings.s3_access_key_id:
                config["access_key_id"] = settings.s3_access_key_id
            if settings.s3_secret_access_key:
                config["secret_access_key"] = settings.s3_secret_access_key
            config["region"] = settings.s3_region
        retry = {"retry_timeout": timedelta(seconds=settings.storage_retry_seconds)}
        store = from_url(  # type: ignore[call-overload]
            url, config=config or None, client_options=client_options or None, retry_config=retry
        )
        probe = from_url(  # type: ignore[call-overload]
            url,
            config=config or None,
            client_options={**client_options, "timeout": PROBE_TIMEOUT, "connect_timeout": PROBE_TIMEOUT},
            retry_config={"max_retries": 0, "retry_timeout": PROBE_TIMEOUT},
        )
        return cls(store, url, probe)

    def put_file(self, key: str, fileobj: IO[bytes]) -> None:
        """Upload a readable binary file, streamed in chunks; the object appears atomically."""
        obstore.put(self._store, key, read_chunks(fileobj), chunk_size=5 * CHUNK_SIZE)

    def put_path(self, key: str, path: Path) -> None:
        obstore.put(self._store, key, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        obstore.put(self._store, key, data)

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        yield from self.open(key)[1]

    def open(self, key: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks) of an object; a missing object raises FileNotFoundError here, before any byte is read."""
        result = obstore.get(self._store, key)
        return int(result.meta["size"]), (bytes(chunk) for chunk in result.stream(min_chunk_size=CHUNK_SIZE))

    def read_bytes(self, key: str) -> bytes:
        return bytes(obstore.get(self._store, key).bytes())

    def download(self, key: str, dest: Path) -> str:
        """Copy an object to a local file; returns its sha256."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        tmp = dest.with_name(dest.name + ".part")
        with tmp.open("wb") as out:
            for chunk in self.iter_bytes(key):
                digest.update(chunk)
                out.write(chunk)
        tmp.replace(dest)
        return digest.hexdigest()

    def exists(self, key: str) -> bool:
        try:
            obstore.head(self._store, key)
        except FileNotFoundError:
            return False
        return True

    def list_keys(self, prefix: str = "") -> list[str]:
        return [meta["path"] for batch in obstore.list(self._store, prefix or None) for meta in batch]

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            obstore.delete(self._store, key)

    def ping(self) -> None:
        """Prove the store answers (within PROBE_TIMEOUT, no retries); raise the store's error otherwise.

        A listing rather than a HEAD: a HEAD in a bucket that does not exist answers "not found" like any
        missing key, a listing fails. It also needs the credentials to be accepted.
        """
        obstore.list_with_delimiter(self._probe_store, PROBE_PREFIX)


def read_chunks(fileobj: IO[bytes]) -> Iterator[bytes]:
    """A binary file as chunks of CHUNK_SIZE bytes."""
    while chunk := fileobj.read(CHUNK_SIZE):
        yield chunk


def delete_after_commit(session: Session, storage: ObjectStorage, keys: list[str], *, what: str) -> None:
    """Delete these objects once the transaction that removed the rows naming them commits (never before: a
    deletion rolled back leaves rows whose objects are still there)."""
    keys = [key for key in keys if key]

    def delete() -> None:
        for key in keys:
            try:
                storage.delete(key)
            except Exception:  # an object left behind costs storage, not correctness
                log.warning("could not delete %s of %s", key, what)

    if keys:
        after_commit(session, delete)
