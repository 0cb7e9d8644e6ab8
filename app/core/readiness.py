"""Readiness checks: whether the database, the broker and the object store each answer, and how fast."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, wait
from functools import partial

import kombu
from kombu.exceptions import ChannelError
from pydantic import BaseModel, Field

from app.core.db import get_engine
from app.core.settings import Settings
from app.core.storage import ObjectStorage

log = logging.getLogger(__name__)

# Each dependency's own bound (connect, request, reply) ...
CHECK_TIMEOUT_S = 2.0
# ... and the bound of the whole answer, for a check its driver cannot bound (a PostgreSQL connect).
READINESS_TIMEOUT_S = 4.0

TIMED_OUT = "timed out"
UNREACHABLE = "unreachable"
ACCESS_DENIED = "access denied"
FAILED = "error (see server log)"


class CheckResult(BaseModel):
    ok: bool
    latency_ms: float = Field(description="How long the check took, in milliseconds")
    message: str | None = Field(
        default=None,
        description=f'Why the check failed: "{UNREACHABLE}", "{TIMED_OUT}", "{ACCESS_DENIED}" or "{FAILED}"; '
        "the details are in the server log",
    )


def check_database(settings: Settings) -> CheckResult:
    def probe() -> None:
        with get_engine(settings.db_url).connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    return _timed("database", probe)


def check_broker(settings: Settings) -> CheckResult:
    def probe() -> None:
        url = settings.broker
        # Bounds the replies of a Redis that accepts connections but never answers. Only for Redis:
        # the SQLAlchemy transport hands its options to create_engine, which refuses this one.
        options = {"socket_timeout": CHECK_TIMEOUT_S} if url.startswith(("redis://", "rediss://")) else {}
        with kombu.Connection(url, connect_timeout=CHECK_TIMEOUT_S, transport_options=options) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=CHECK_TIMEOUT_S)
            # Connecting alone proves nothing on the SQLAlchemy transport (it opens its database lazily):
            # ask for the training queue, read-only on Redis.
            try:
                conn.default_channel.queue_declare(queue=settings.queue_name, passive=True)
            except ChannelError as exc:
                if str(exc.reply_code) != "404":
                    raise  # "no such queue" (404) is an answer: the broker is there; anything else is not

    return _timed("broker", probe)


def check_object_store(storage: ObjectStorage) -> CheckResult:
    return _timed("object store", storage.ping)


def check_readiness(
    settings: Settings, storage: ObjectStorage, timeout: float = READINESS_TIMEOUT_S
) -> dict[str, CheckResult]:
    """Every check by name (`database`, `broker`, `object_store`), run concurrently, within `timeout` seconds."""
    return run_concurrently(
        {
            "database": partial(check_database, settings),
            "broker": partial(check_broker, settings),
            "object_store": partial(check_object_store, storage),
        },
        timeout,
    )


class ReadinessProbe:
    """One round of checks at a time per process, its answer reused for `max_age` seconds.

    `/readyz` answers without a key: a flood of probes must not open connections and threads in proportion
    to the requests (a hung dependency holds a check's thread until its driver gives up).
    """

    def __init__(self, max_age: float = 1.0) -> None:
        self.max_age = max_age
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._results: dict[str, CheckResult] = {}

    def results(self, settings: Settings, storage: ObjectStorage) -> dict[str, CheckResult]:
        with self._lock:
            if time.monotonic() - self._checked_at > self.max_age:
                self._results = check_readiness(settings, storage)
                self._checked_at = time.monotonic()
            return self._results


def run_concurrently(checks: Mapping[str, Callable[[], CheckResult]], timeout: float) -> dict[str, CheckResult]:
    """Run each check in its own thread; one still running after `timeout` seconds is reported as timed out.

    Daemon threads rather than an executor: a check stuck where its driver has no timeout is left behind
    (it ends when the driver gives up), and neither the answer nor the process's exit waits for it.
    """
    start = time.perf_counter()
    futures: dict[str, Future[CheckResult]] = {}
    for name, check in checks.items():
        future: Future[CheckResult] = Future()
        threading.Thread(target=_settle, args=(future, check), name=f"readiness-{name}", daemon=True).start()
        futures[name] = future
    wait(futures.values(), timeout=timeout)
    elapsed_ms = _ms_since(start)
    results: dict[str, CheckResult] = {}
    for name, future in futures.items():
        if future.done():
            results[name] = future.result()
        else:
            log.warning("readiness: the %s check did not finish within %.1f s", name, timeout)
            results[name] = CheckResult(ok=False, latency_ms=elapsed_ms, message=TIMED_OUT)
    return results


def _settle(future: Future[CheckResult], check: Callable[[], CheckResult]) -> None:
    future.set_result(check())


def _timed(name: str, probe: Callable[[], object]) -> CheckResult:
    start = time.perf_counter()
    try:
        probe()
    except Exception as exc:
        message = _summarize(exc)
        log.warning("readiness: the %s is not ready (%s)", name, message, exc_info=True)
        return CheckResult(ok=False, latency_ms=_ms_since(start), message=message)
    return CheckResult(ok=True, latency_ms=_ms_since(start))


def _summarize(exc: BaseException) -> str:
    """A fixed phrase for an operator: never the exception's text, which names hosts, ports and paths."""
    chain = _chain(exc)
    names = " ".join(type(e).__name__ for e in chain).lower()
    # The drivers' own words, only matched: reqwest's `TimedOut`, psycopg's "timeout expired", ...
    text = " ".join(str(e) for e in chain).lower()
    if any(isinstance(e, TimeoutError) for e in chain) or "timeouterror" in names:
        return TIMED_OUT
    if any(phrase in text for phrase in ("timed out", "timedout", "timeout expired")):
        return TIMED_OUT
    if any(word in names for word in ("permissiondenied", "unauthenticated", "authentication")):
        return ACCESS_DENIED
    if "authentication failed" in text or "access denied" in text:
        return ACCESS_DENIED
    if any(isinstance(e, ConnectionError) for e in chain):
        return UNREACHABLE
    if any(
        phrase in text
        for phrase in ("connection refused", "connectionrefused", "kind: connect,", "name or service not known")
    ):
        return UNREACHABLE
    return FAILED


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)
