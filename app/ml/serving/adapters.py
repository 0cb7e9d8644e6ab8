"""Adapters for the engine: fetched lazily, converted once into what a batch applies, kept in a byte-budgeted LRU.

Where an adapter is, from nearest to farthest:
1. device memory: the converted form the engine applies (`Servable`), least recently used first, within
   `device_bytes`; adapters in the running batch are pinned and never evicted;
2. host memory (only when the device is not the CPU): the same tensors on the CPU, within `host_bytes`;
3. the local disk: the unpacked artifact under `cache_dir`, within `disk_bytes` (least recently used go);
4. the object store: the published archive, checked against its sha256.
Replicas may share `cache_dir`: a folder appears whole (unpacked aside, then renamed into place) and leaves whole
(renamed to a tombstone, then deleted), so no process ever reads a half-deleted one; a cached folder that still
cannot be read (damaged on disk) is dropped and fetched again from the object store, once.
Fetching and reading files (3-4 to 2) runs on loader threads, once per adapter however many requests wait for it;
what needs the model (DoRA's weight norms, prompt-learning prompts, weight-delta copies) runs on the engine thread.
A missing or damaged adapter fails only the requests that asked for it.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from app.ml import adapter_format
from app.ml.blobs import BlobStore
from app.ml.serving.kinds import ArtifactMismatch, HostAdapter
from app.ml.serving.requests import AdapterRef, AdapterUnavailable

log = logging.getLogger(__name__)

TOMBSTONE_SUFFIX = ".deleted"  # `.<adapter id>.<unique>.deleted`: an unpacked adapter on its way off the disk


class AdapterStore:
    """The disk and host tiers (and the loader threads) behind each base model's device tier (residency.py)."""

    def __init__(
        self,
        *,
        storage: BlobStore,
        cache_dir: Path,
        dtype: Any,
        host_bytes: int,
        disk_bytes: int,
        threads: int = 2,
    ) -> None:
        self.storage = storage
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.host_bytes = host_bytes
        self.disk_bytes = disk_bytes
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()
        self._loading: dict[str, Future[HostAdapter]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="adapter-loader")
        self.hits = self.misses = 0  # the local disk: unpacked already, or downloaded from the object store
        self.host_hits = self.host_misses = 0  # host memory: read already, or read from the disk now

    def fetch(self, ref: AdapterRef, *, weights_sha256: str) -> Future[HostAdapter]:
        """The adapter read into host memory: at once if it is there, else one load however many ask."""
        with self._lock:
            host = self._host.get(ref.id)
            if host is not None:
                self.host_hits += 1
                self._host.move_to_end(ref.id)
                done: Future[HostAdapter] = Future()
                done.set_result(host)
                return done
            self.host_misses += 1
            loading = self._loading.get(ref.id)
            if loading is None:
                loading = self._loading[ref.id] = self._pool.submit(self._load, ref, weights_sha256)
            return loading

    def keep_on_host(self, host: HostAdapter) -> None:
        with self._lock:
            self._host[host.ref.id] = host
            self._host.move_to_end(host.ref.id)
            while len(self._host) > 1 and sum(h.n_bytes for h in self._host.values()) > self.host_bytes:
                self._host.popitem(last=False)

    def host_bytes_used(self) -> int:
        with self._lock:
            return sum(h.n_bytes for h in self._host.values())

    def _load(self, ref: AdapterRef, weights_sha256: str) -> HostAdapter:
        try:
            for cached_ok in (True, False):
                folder, cached = self._local(ref, cached_ok=cached_ok)
                try:
                    return ref.kind.read(ref, folder, weights_sha256=weights_sha256, dtype=self.dtype)
                except ArtifactMismatch as exc:
                    raise AdapterUnavailable(ref.id, f"it cannot be applied to its base model: {exc}") from None
                except Exception:
                    if not cached:  # just fetched: the artifact is damaged, which fails its own requests only
                        log.exception("adapter %s could not be read", ref.id)
                        raise AdapterUnavailable(ref.id, "its stored files could not be read") from None
                    # The disk's copy, not the artifact, may be what is damaged: drop it and fetch it again, once.
                    log.warning("adapter %s: its cached files could not be read; fetching them again", ref.id)
                    self._remove(folder)
            raise AssertionError("unreachable: the second pass fetches from the object store")
        finally:
            with self._lock:
                self._loading.pop(ref.id, None)

    def _local(self, ref: AdapterRef, *, cached_ok: bool = True) -> tuple[Path, bool]:
        """The unpacked artifact on the local disk, fetched from the object store if it is not there (or, without
        `cached_ok`, in any case); and whether it was there already."""
        folder = self.cache_dir / ref.id
        if cached_ok and (folder / adapter_format.MANIFEST).exists():
            try:
                os.utime(folder)  # most recently used
            except FileNotFoundError:  # removed by another process meanwhile: fetched below
                pass
            else:
                self.hits += 1
                return folder, True
        self.misses += 1
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        unique = uuid.uuid4().hex  # processes may share the folder (replicas on one volume)
        archive = self.cache_dir / f".{ref.id}.{unique}.tar.gz"
        try:
            sha = self.storage.download(ref.storage_key, archive)
        except FileNotFoundError:
            raise AdapterUnavailable(ref.id, "its stored files are missing") from None
        if sha != ref.sha256:
            archive.unlink(missing_ok=True)
            log.error("adapter %s: checksum mismatch (%s != %s)", ref.id, sha, ref.sha256)
            raise AdapterUnavailable(ref.id, "its stored files are damaged (checksum mismatch)")
        staging = self.cache_dir / f".{ref.id}.{unique}"
        try:
            adapter_format.unpack(archive, staging)
            try:
                staging.rename(folder)
            except OSError:  # another process unpacked it first: the same checked files
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            archive.unlink(missing_ok=True)
        self._trim_disk(keep=ref.id)
        return folder, False

    def _remove(self, folder: Path) -> None:
        """Take an unpacked adapter off the disk as one step for every process that shares it: renamed to a
        tombstone (a dot name: never read, never counted), then deleted."""
        tombstone = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}{TOMBSTONE_SUFFIX}")
        try:
            folder.rename(tombstone)
        except FileNotFoundError:  # another process removed it first
            return
        shutil.rmtree(tombstone, ignore_errors=True)

    def forget(self, adapter_id: str) -> None:
        """Drop an adapter from host memory (its files went missing from the disk: the next fetch gets them)."""
        with self._lock:
            self._host.pop(adapter_id, None)

    def _trim_disk(self, keep: str) -> None:
        """Least recently used unpacked adapters off the disk until the rest fit `disk_bytes`."""
        sizes: dict[Path, tuple[float, int]] = {}
        with self._lock:  # prompt-learning adapters in host memory are read from their folder when materialized
            in_use = {keep, *self._host, *self._loading}
        for folder in self.cache_dir.iterdir():
            if folder.name.endswith(TOMBSTONE_SUFFIX):  # left by a process that died while deleting it
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if not folder.is_dir() or folder.name.startswith(".") or folder.name.endswith(".tmp"):  # being unpacked
                continue
            try:
                size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                sizes[folder] = (folder.stat().st_mtime, size)
            except FileNotFoundError:
                continue
        folders = sorted(sizes, key=lambda p: sizes[p][0])
        total = sum(size for _, size in sizes.values())
        for folder in folders:
            if total <= self.disk_bytes:
                break
            if folder.name not in in_use:
                self._remove(folder)
                total -= sizes[folder][1]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
