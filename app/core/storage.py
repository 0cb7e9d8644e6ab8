"""Object storage over obstore: one API for a local folder, S3-compatible stores, GCS and Azure."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import obstore
from obstore.store import LocalStore, from_url

from app.core.settings import Settings

CHUNK_SIZE = 1024 * 1024


class ObjectStorage:
    """Keys are relative paths such as `datasets/<tenant>/<file id>.jsonl`."""

    def __init__(self, store: Any, url: str) -> None:
        self._store = store
        self.url = url

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStorage:
        url = settings.storage
        parsed = urlparse(url)
        if parsed.scheme == "file":
            root = Path(parsed.path)
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
        store = from_url(url, config=config or None, client_options=client_options or None)  # type: ignore[arg-type]
        return cls(store, url)

    def put_file(self, key: str, fileobj: IO[bytes]) -> None:
        """Upload a readable binary file, streamed in chunks; the object appears atomically."""
        obstore.put(self._store, key, _chunks(fileobj), chunk_size=5 * CHUNK_SIZE)

    def put_path(self, key: str, path: Path) -> None:
        obstore.put(self._store, key, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        obstore.put(self._store, key, data)

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        result = obstore.get(self._store, key)
        for chunk in result.stream(min_chunk_size=CHUNK_SIZE):
            yield bytes(chunk)

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


def _chunks(fileobj: IO[bytes]) -> Iterator[bytes]:
    while chunk := fileobj.read(CHUNK_SIZE):
        yield chunk
