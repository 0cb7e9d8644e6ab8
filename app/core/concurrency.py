"""Per-tenant bounds on long-lived requests (uploads in progress, open event streams), so that one tenant's load
stays that tenant's problem: past its bound a tenant's next request is refused with 429 and `Retry-After` before
it does any work, while other tenants are served as usual; and per-tenant worker threads for blocking work that
many requests of one tenant could otherwise pile onto the shared thread pool.

The counts are this process's (an API replica bounds its own requests); the generation engine bounds each
tenant's requests itself (app/ml/serving/scheduler.py).
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio

from app.core.errors import ErrorCode, TooManyRequests

T = TypeVar("T")


class TenantThreads:
    """Worker threads for one kind of blocking work (preparing generation requests, polling event streams), at most
    `per_tenant` of one tenant's at once, apart from the thread pool that serves every other request: one tenant's
    hundreds of requests neither take the threads other tenants' requests need nor make theirs wait behind them."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._lock = threading.Lock()

    async def run(self, tenant_id: str, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`function(*args, **kwargs)` in a worker thread, one of the tenant's."""
        with self._lock:
            limiter = self._limiters.get(tenant_id) or self._limiters.setdefault(
                tenant_id, anyio.CapacityLimiter(self.per_tenant)
            )
        return await anyio.to_thread.run_sync(functools.partial(function, *args, **kwargs), limiter=limiter)


class TooManyInProgress(TooManyRequests):
    """429: the tenant has as many of these requests in progress as it may."""


class TenantSlots:
    """How many requests of one kind each tenant has in progress, at most `limit`."""

    def __init__(self, *, limit: int, what: str, setting: str, code: ErrorCode, retry_after: int = 5) -> None:
        self.limit = limit
        self.what = what  # "uploads in progress"
        self.setting = setting  # the setting that raises the limit, named in the error
        self.code = code
        self.retry_after = retry_after
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, tenant_id: str) -> Slot:
        with self._lock:
            if self._held[tenant_id] >= self.limit:
                raise TooManyInProgress(
                    f"this tenant already has {self.limit} {self.what}, its limit ({self.setting}); "
                    "wait for one to end",
                    retry_after=self.retry_after,
                    code=self.code,
                )
            self._held[tenant_id] += 1
        return Slot(self, tenant_id)

    @contextmanager
    def hold(self, tenant_id: str) -> Iterator[None]:
        slot = self.acquire(tenant_id)
        try:
            yield
        finally:
            slot.release()

    def held(self, tenant_id: str) -> int:
        with self._lock:
            return self._held[tenant_id]

    def _release(self, tenant_id: str) -> None:
        with self._lock:
            self._held[tenant_id] -= 1
            if self._held[tenant_id] <= 0:
                del self._held[tenant_id]


class Slot:
    """One request's place among its tenant's; `release` it once (later calls do nothing)."""

    def __init__(self, slots: TenantSlots, tenant_id: str) -> None:
        self._slots = slots
        self._tenant_id = tenant_id
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slots._release(self._tenant_id)
