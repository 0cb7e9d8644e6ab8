"""Settings for every process, read from `TUNEFORGE_*` environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "tuneforge"


class Settings(BaseSettings):
    """All configuration. Every field has a default that works for the embedded mode."""

    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore")

    # --- where things live -------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Folder for the embedded database, broker, object store and model cache.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL. Default: SQLite file in the data dir. "
        "PostgreSQL: postgresql+psycopg://user:pass@host/db",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker URL. Default: Celery over SQLite in the data dir. Redis: redis://host:6379/0",
    )
    storage_url: str | None = Field(
        default=None,
        description="Object store URL. Default: a local folder in the data dir (file:///...). "
        "S3-compatible: s3://bucket/prefix",
    )
    model_cache_dir: Path | None = Field(
        default=None,
        description="Where converted base models are cached. Default: <data dir>/models",
    )

    # --- S3-compatible object storage -----------------------------------------------------
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint, e.g. http://minio:9000")
    s3_access_key_id: str | None = Field(default=None, description="S3 access key id")
    s3_secret_access_key: str | None = Field(default=None, description="S3 secret access key")
    s3_region: str = Field(default="us-east-1", description="S3 region")

    # --- API ------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address the API binds to")
    port: int = Field(default=8000, description="Port the API listens on")
    max_upload_bytes: int = Field(
        default=100 * 1024 * 1024, gt=0, description="Largest training file accepted, in bytes"
    )
    max_reported_line_errors: int = Field(
        default=100, gt=0, le=10_000, description="How many bad lines a rejected upload lists at most"
    )
    max_uploads_per_tenant: int = Field(
        default=4,
        gt=0,
        le=10_000,
        description="Uploads one tenant may have in progress at once (per API process); past it, 429 with Retry-After",
    )
    upload_grace_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long an upload may take to start sending its body; from then on it must keep up "
        "upload_min_bytes_per_second on average, or it is cut off with 408",
    )
    upload_min_bytes_per_second: int = Field(
        default=16 * 1024,
        gt=0,
        description="Slowest average rate at which an upload's body may arrive (after upload_grace_seconds)",
    )
    max_event_streams_per_tenant: int = Field(
        default=16,
        gt=0,
        le=10_000,
        description="Event streams (GET /jobs/{id}/events?stream=true) one tenant may have open at once (per API "
        "process); past it, 429 with Retry-After",
    )
    max_request_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="Largest request body of every endpoint except file uploads, in bytes",
    )

    # --- models, training and serving ------------------------------------------------------
    default_base_model: str = Field(
        default="smollm2-135m-instruct", description="Base model used when a request names none"
    )
    queue_name: str = Field(
        default="training",
        description="Celery queue the training tasks go to (jobs whose method needs CUDA, qlora, go to "
        "<queue_name>-cuda, which only workers that train on CUDA consume)",
    )
    max_active_jobs_per_tenant: int = Field(
        default=16,
        gt=0,
        le=100_000,
        description="Jobs a tenant may have queued or running at once; POST /jobs answers 429 past it",
    )
    max_stored_bytes_per_tenant: int = Field(
        default=50 * 1024**3,
        gt=0,
        description="Bytes a tenant may keep stored (files, adapters, checkpoints) with what its active jobs "
        "reserved for their checkpoints and adapters; uploads and new jobs past it are refused with 403 "
        "storage_quota_exceeded",
    )
    heartbeat_seconds: float = Field(
        default=10.0, gt=0, le=3600, description="How often a worker says it is alive while it trains a job"
    )
    heartbeat_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        le=86_400,
        description="A running job whose heartbeat is older than this is taken to be on a dead worker: the reaper "
        "puts it back in the queue (it resumes from its latest checkpoint) and another worker may claim it",
    )
    reaper_seconds: float = Field(
        default=30.0,
        ge=0,
        le=86_400,
        description="How often each API and worker process looks for running jobs with a stale heartbeat "
        "(0: never; safe to run on every replica)",
    )
    queued_resend_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="A job queued for longer than this without a worker taking it has its task sent again by the "
        "reaper (its task may have been lost between the database and the broker; a task delivered twice is "
        "claimed once), and again after each such interval",
    )
    max_job_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Workers a job may lose (each stopped answering while it ran) before the reaper fails it "
        "instead of re-queueing it; a worker stopped gracefully hands the job back without counting",
    )
    checkpoint_minutes: float = Field(
        default=30.0,
        gt=0,
        description="A running job also saves a checkpoint when this long has passed since its last one",
    )
    storage_retry_seconds: float = Field(
        default=180.0,
        gt=0,
        le=3600,
        description="How long a request to the object store is retried, with back-off, before it fails (a worker "
        "that cannot read a checkpoint to resume from then hands the job back to the queue)",
    )
    db_retry_seconds: float = Field(
        default=120.0,
        ge=0,
        le=86_400,
        description="How long a worker retries a database write while the database is unreachable before it "
        "gives the job up to the reaper",
    )
    cuda_workers: bool | None = Field(
        default=None,
        description="Whether workers that train on CUDA with bitsandbytes serve this service, so that POST /jobs "
        "accepts methods that need them (qlora); unset: whether this process itself could",
    )
    serving_max_adapters: int = Field(
        default=64, gt=0, description="Adapters kept in device memory per base model in a serving process"
    )
    serving_adapter_cache_bytes: int = Field(
        default=1 << 30,
        gt=0,
        description="Bytes of adapters (LoRA, IA3, prompts) kept in device memory per base model; least recently "
        "used go first, adapters of running requests stay. Weight deltas are bounded apart: at most twice the base "
        "model's bytes",
    )
    serving_host_cache_bytes: int = Field(
        default=4 << 30, ge=0, description="Bytes of adapters kept in host memory when serving on a GPU"
    )
    serving_disk_cache_bytes: int = Field(
        default=20 << 30, gt=0, description="Bytes of unpacked adapters kept on the local disk (data_dir)"
    )
    serving_max_batch: int = Field(default=32, ge=1, le=1024, description="Requests decoding together in one batch")
    serving_max_waiting: int = Field(
        default=256,
        ge=1,
        description="Requests waiting to join the batch; past it, generation requests get 429 with Retry-After",
    )
    serving_max_requests_per_tenant: int = Field(
        default=128,
        ge=1,
        description="Generation requests one tenant may have waiting or running in a serving process; past it, "
        "that tenant's requests get 429 with Retry-After. The waiting line is fair across tenants: each tenant's "
        "oldest request goes first, and a tenant with none waiting is never refused for the line being full",
    )
    serving_max_choices: int = Field(
        default=8,
        ge=1,
        le=128,
        description="Choices one generation request may ask for (OpenAI's `n`); each is a request in the engine, "
        "counted against the tenant's bound above",
    )
    serving_kv_cache_bytes: int = Field(
        default=2 << 30,
        gt=0,
        description="KV-cache bytes the running batch may take per base model (rows padded to the longest); a "
        "request joins the batch when it fits",
    )
    train_max_batch_tokens: int = Field(
        # About 1.9 MiB a token in flight for LoRA on the 135M model in float32 (bench/training.py --memory-job);
        # raise it on bigger machines, lower it for bigger models.
        default=2048,
        ge=64,
        description="Token budget of one training micro-batch (examples x padded length), and the longest example a "
        "job may train. A step of batch_size examples is split into micro-batches under it, with gradient "
        "accumulation; it bounds the worker's memory. A CPU worker fills micro-batches of packed examples to "
        "at most 1024 tokens (faster it is not) but still trains a longer example, alone",
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d{1,3})?)$",
        description="Where the worker trains and the server generates: auto (the first CUDA GPU if there is one, "
        "else the CPU), cpu, cuda, cuda:N or mps. Run one worker per GPU with CUDA_VISIBLE_DEVICES",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Precision of the base model's weights and activations: auto (bfloat16 on a GPU that "
        "supports it, else float32), float32, bfloat16 or float16. Trainable weights stay float32",
    )
    worker_devices: str = Field(
        default="1",
        pattern=r"^(\d{1,2}|\d{1,3}(,\d{1,3}){1,63})$",
        description="The devices a training worker owns (`tuneforge worker --devices`): a count (4: the first 4 "
        "CUDA devices it sees; on a CPU, 4 gloo processes) or a list of CUDA indices (0,1,2,3). A job with "
        "resources.devices N runs on N of them, one torchrun rank each; a 1-device job on the first",
    )
    torchrun_one_device: bool = Field(
        default=False,
        description="Run 1-device jobs under torchrun too, as one rank (DDP, FSDP2 for full, over NCCL on a GPU): "
        "the multi-device path proven on a machine with one GPU, as bench/gpu_check.py does; off, a 1-device job "
        "runs in the worker's own process",
    )
    torch_threads: int | None = Field(
        default=None, description="torch intra-op threads in the worker and server (default: torch's own)"
    )

    # --- observability ---------------------------------------------------------------------
    log_level: str = Field(default="INFO", description="Log level of the tuneforge commands")
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="Log lines of the API, the worker and `tuneforge up` on stderr: json (one object a line: time, "
        "level, logger, message, request_id, job_id...) or text (the same, for a person at a terminal)",
    )
    log_every_steps: int = Field(
        default=10, ge=1, le=1_000_000, description="The worker logs a running job's progress every this many steps"
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="When set, GET /metrics answers only `Authorization: Bearer <this token>`; unset, it is public "
        "like /healthz (aggregate counts across tenants: no ids, names or text)",
    )

    # --- evals -------------------------------------------------------------------------------
    eval_max_items: int = Field(
        default=1000, ge=1, le=100_000, description="Data items one eval run may have (inline or in its file)"
    )
    eval_max_item_bytes: int = Field(
        default=64 * 1024, ge=256, le=16 * 1024 * 1024, description="The largest data item of an eval run, as JSON"
    )
    eval_max_criteria: int = Field(default=16, ge=1, le=256, description="Testing criteria (graders) one eval may have")
    eval_max_template_chars: int = Field(
        default=32 * 1024,
        ge=64,
        le=1024 * 1024,
        description="The longest template text of an eval's graders or of a run's input messages, all messages "
        "together",
    )
    eval_items_at_once: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Items of one run answered and graded at once (their generations share the serving engine's "
        "batches with every other request)",
    )
    eval_lease_seconds: float = Field(
        default=60.0,
        ge=5,
        le=3600,
        description="How long an API process holds a run between progress writes; a run whose process died is taken "
        "over by another (or the same, restarted) once its lease has run out",
    )
    eval_poll_seconds: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description="How often each API process looks for eval runs to execute (0: this process runs none)",
    )

    # --- sweeps ------------------------------------------------------------------------------
    sweep_max_configurations: int = Field(
        default=32, ge=1, le=256, description="Configurations one sweep may have (listed, or its grid's product)"
    )
    sweep_poll_seconds: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description="How often each API process advances the running sweeps: records their jobs' ends, starts the "
        "next configurations (0: this process advances none)",
    )

    # --- webhooks ----------------------------------------------------------------------------
    webhook_allow_private_urls: bool = Field(
        default=False,
        description="Whether webhook endpoints may be at private, loopback or link-local addresses (the host is "
        "resolved when the endpoint is registered and again at each delivery); off, such URLs are refused with 422",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="How long one delivery attempt may take in all (resolving, connecting, sending, the answer's "
        "status line and headers; its body is never read); past it the attempt counts as failed",
    )
    webhook_retry_seconds: float = Field(
        default=72 * 3600.0,
        ge=0,
        le=30 * 86_400,
        description="How long after its event a delivery is retried (a receiver that answers other than 2xx, or not "
        "at all); then it is marked failed. 0: one attempt only",
    )
    webhook_retry_initial_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="The wait before a delivery's first retry; it doubles after each failed attempt, up to an hour",
    )
    webhook_poll_seconds: float = Field(
        default=2.0,
        ge=0,
        le=3600,
        description="How often each API and worker process looks for deliveries that are due (a retry; an event "
        "of another process), besides at once after its own events (0: this process sends none)",
    )
    webhook_max_endpoints_per_tenant: int = Field(
        default=16,
        ge=1,
        le=1000,
        description="Webhook endpoints one tenant may register; past it, 409 too_many_webhook_endpoints",
    )

    tinker_session_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="A Tinker session whose client sends no heartbeat (every 10 s) for this long is closed, and its "
        "training runs and their models freed",
    )
    tinker_max_sessions_per_tenant: int = Field(
        default=8, ge=1, le=1000, description="Tinker sessions one tenant may have open; past it, 409"
    )
    tinker_max_runs: int = Field(
        default=4,
        ge=0,
        le=1000,
        description="Tinker training runs this API process holds at once (each a base model and a LoRA in memory, "
        "on TUNEFORGE_DEVICE); past it, 409 too_many_runs",
    )
    tinker_max_runs_per_tenant: int = Field(
        default=2, ge=1, le=1000, description="Tinker training runs one tenant may hold at once"
    )
    tinker_max_pending_per_tenant: int = Field(
        default=256, ge=1, le=100_000, description="Tinker requests of one tenant not yet finished"
    )
    tinker_max_examples: int = Field(
        default=256, ge=1, le=100_000, description="Examples in one Tinker forward/backward request"
    )
    tinker_max_batch_tokens: int = Field(
        default=4096,
        ge=16,
        le=10_000_000,
        description="Examples × longest example's tokens in one Tinker forward/backward request: the activations it "
        "holds (the output layer runs a few hundred positions at a time, as in the training recipe)",
    )
    tinker_max_request_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        description="The largest Tinker forward/backward request body (protobuf)",
    )
    tinker_poll_seconds: float = Field(
        default=20.0,
        gt=0,
        le=40,
        description="How long a Tinker `retrieve_future` waits for its result before answering try_again (under "
        "the client's 45 s timeout)",
    )

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        data_dir = self.data_dir.expanduser().resolve()
        self.data_dir = data_dir
        if self.database_url is None:
            self.database_url = f"sqlite:///{data_dir / 'tuneforge.db'}"
        if self.broker_url is None:
            self.broker_url = f"sqla+sqlite:///{data_dir / 'broker.db'}"
        if self.storage_url is None:
            self.storage_url = (data_dir / "objects").as_uri()
        if self.model_cache_dir is None:
            self.model_cache_dir = data_dir / "models"
        return self

    # Narrowed accessors: after validation these are never None.
    @property
    def db_url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    @property
    def broker(self) -> str:
        assert self.broker_url is not None
        return self.broker_url

    @property
    def storage(self) -> str:
        assert self.storage_url is not None
        return self.storage_url

    @property
    def models_dir(self) -> Path:
        assert self.model_cache_dir is not None
        return self.model_cache_dir

    @property
    def tmp_dir(self) -> Path:
        """Scratch files (uploads being received, exports being packed): in the data dir, never the system /tmp."""
        return self.data_dir / "tmp"


@lru_cache
def get_settings() -> Settings:
    return Settings()
