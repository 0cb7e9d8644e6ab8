"""Prometheus metrics at `GET /metrics`: jobs by state, queue depth and training speed (read from the database and
the broker at scrape time), generation latency and tokens, and the serving engine's adapter cache.

Each app has its own registry (tests build many apps in one process). Job and queue metrics are the
deployment's, read from the shared database and broker: only the `api` role exposes them, so that summing over
serving replicas counts nothing twice. A dependency that does not answer leaves its metrics out of that scrape;
the scrape itself still answers.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import kombu
from fastapi import APIRouter, Request, Response
from kombu.exceptions import ChannelError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.core.db import session_scope
from app.core.errors import DATABASE_ERRORS, ErrorCode, Unauthorized
from app.core.models import Job, JobStatus, db_now
from app.core.queue import cuda_queue
from app.core.settings import Settings

log = logging.getLogger(__name__)

# Bounds a broker that accepts connections but never answers, so that a scrape stays within Prometheus's timeout.
BROKER_TIMEOUT_S = 2.0
# Generation requests take from milliseconds (a few tokens) to minutes (long texts on a CPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

router = APIRouter()


class HasStats(Protocol):
    def stats(self) -> dict[str, int]: ...


class JobsCollector(Collector):
    """`tuneforge_jobs{state}` and `tuneforge_training_tokens_per_second`, from the database at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterable[Metric]:
        try:
            counts, running = self._read()
        except DATABASE_ERRORS as exc:
            log.warning("metrics: the database did not answer (%s); job metrics left out", type(exc).__name__)
            return
        except Exception:  # a pool timeout, say: the scrape goes on without them
            log.exception("metrics: job metrics could not be read; left out")
            return
        jobs = GaugeMetricFamily("tuneforge_jobs", "Jobs by state, all tenants", labels=["state"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status, 0))
        yield jobs
        speeds = [m.get("tokens_per_second") for m in running]
        yield GaugeMetricFamily(
            "tuneforge_training_tokens_per_second",
            "Training speed summed over running jobs with a live worker (each job's latest step)",
            value=sum(s for s in speeds if isinstance(s, int | float)),
        )

    def _read(self) -> tuple[dict[JobStatus, int], list[dict[str, Any]]]:
        live_since = db_now(-self.settings.heartbeat_timeout_seconds)  # heartbeats are the database's clock
        with session_scope(self.settings.db_url) as session:
            counts = {status: n for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}
            running = session.scalars(
                select(Job.metrics).where(Job.status == JobStatus.running, Job.heartbeat_at >= live_since)
            ).all()
        return counts, list(running)


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in the training queues (taken but unacknowledged ones, a running job's, not counted),
    asked of the broker through kombu, whatever the transport. Raises if the broker does not answer."""
    url = settings.broker
    # As in the readiness check: only Redis takes a socket timeout; the SQLAlchemy transport refuses it.
    options = {"socket_timeout": BROKER_TIMEOUT_S} if url.startswith(("redis://", "rediss://")) else {}
    depths = {}
    with kombu.Connection(url, connect_timeout=BROKER_TIMEOUT_S, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_S)
        for queue in (settings.queue_name, cuda_queue(settings.queue_name)):
            try:
                depths[queue] = int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
            except ChannelError as exc:
                if str(exc.reply_code) != "404":
                    raise
                depths[queue] = 0  # Redis: an empty queue does not exist
    return depths


class QueueCollector(Collector):
    """`tuneforge_queue_depth{queue}` from the broker at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterable[Metric]:
        try:
            depths = queue_depths(self.settings)
        except Exception as exc:  # any transport's failure: the metric is absent, the scrape goes on
            log.warning("metrics: the broker did not answer (%s); queue depth left out", type(exc).__name__)
            return
        family = GaugeMetricFamily(
            "tuneforge_queue_depth", "Training jobs waiting in the broker's queue", labels=["queue"]
        )
        for queue, depth in depths.items():
            family.add_metric([queue], depth)
        yield family


# engine.stats() key -> (metric, tier)
ADAPTER_CACHE_COUNTERS = {
    "adapter_device_hits": ("hits", "device"),
    "adapter_device_misses": ("misses", "device"),
    "adapter_host_hits": ("hits", "host"),
    "adapter_host_misses": ("misses", "host"),
    "adapter_disk_hits": ("hits", "disk"),
    "adapter_disk_misses": ("misses", "disk"),
}
ADAPTER_CACHE_BYTES = {"adapter_device_bytes": "device", "adapter_host_bytes": "host"}


class EngineCollector(Collector):
    """The serving engine's state and adapter cache, from `engine.stats()` at scrape time (zeros before the first
    generation request starts the engine)."""

    def __init__(self, engine: Callable[[], HasStats | None]) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine()
        try:
            stats = engine.stats() if engine is not None else {}
        except Exception:  # the scrape goes on without them
            log.exception("metrics: the serving engine's stats could not be read; left out")
            return
        hits = CounterMetricFamily(
            "tuneforge_adapter_cache_hits",
            "Adapter lookups served by a cache tier: device (a request's adapter already on the serving device), "
            "host (already read into memory), disk (already unpacked on the local disk)",
            labels=["tier"],
        )
        misses = CounterMetricFamily(
            "tuneforge_adapter_cache_misses",
            "Adapter lookups a cache tier could not serve (device: loaded for the request; host: read from the "
            "disk; disk: downloaded from the object store)",
            labels=["tier"],
        )
        for key, (kind, tier) in ADAPTER_CACHE_COUNTERS.items():
            (hits if kind == "hits" else misses).add_metric([tier], stats.get(key, 0))
        yield hits
        yield misses
        resident = GaugeMetricFamily(
            "tuneforge_adapter_cache_bytes", "Bytes of adapters held by a cache tier", labels=["tier"]
        )
        for key, tier in ADAPTER_CACHE_BYTES.items():
            resident.add_metric([tier], stats.get(key, 0))
        yield resident
        yield GaugeMetricFamily(
            "tuneforge_generation_running", "Requests decoding in the batch", value=stats.get("running", 0)
        )
        yield GaugeMetricFamily(
            "tuneforge_generation_waiting", "Requests waiting to join the batch", value=stats.get("waiting", 0)
        )
        yield CounterMetricFamily(
            "tuneforge_generation_steps", "Decoding steps the serving engine has taken", value=stats.get("steps", 0)
        )


class Metrics:
    """The app's registry and the metrics its code observes (generation), plus the collectors read at scrape."""

    def __init__(self, settings: Settings, *, role: str, engine: Callable[[], HasStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.generation_latency = Histogram(
            "tuneforge_generation_latency_seconds",
            "Time from a generation request's submission to the serving engine to its last token",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        for stream in ("false", "true"):  # both series from the start, at zero
            self.generation_latency.labels(stream)
        self.generation_requests = Counter(
            "tuneforge_generation_requests",
            "Generation requests ended, by finish reason (stop, length, cancelled: the client went away; error)",
            ["finish_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "tuneforge_generation_prompt_tokens", "Prompt tokens of generation requests", registry=self.registry
        )
        self.completion_tokens = Counter(
            "tuneforge_generation_completion_tokens",
            "Tokens generated (tokens/s: rate() of this counter)",
            registry=self.registry,
        )
        if role == "api":
            self.registry.register(JobsCollector(settings))
            self.registry.register(QueueCollector(settings))
        self.registry.register(EngineCollector(engine))

    def generation_ended(
        self, *, seconds: float, finish_reason: str, prompt_tokens: int, completion_tokens: int, stream: bool
    ) -> None:
        """Called from the serving engine's thread as each request ends."""
        self.generation_requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        if finish_reason in ("stop", "length"):  # a cancelled or failed request's time says nothing of speed
            self.generation_latency.labels("true" if stream else "false").observe(seconds)


def _authorized(request: Request, settings: Settings) -> bool:
    if settings.metrics_token is None:
        return True
    expected = f"Bearer {settings.metrics_token.get_secret_value()}".encode()
    return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)


@router.get("/metrics", include_in_schema=False)  # for Prometheus, not API clients (nor the API's fuzz tests)
def metrics(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    if not _authorized(request, settings):
        raise Unauthorized(
            "GET /metrics needs `Authorization: Bearer <TUNEFORGE_METRICS_TOKEN>`", code=ErrorCode.invalid_token
        )
    registry: CollectorRegistry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
