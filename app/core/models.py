"""ORM models: tenants, API keys, files, jobs (with their event log), adapters, registered base models and webhook
endpoints with their deliveries."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    literal,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware timestamps on every backend (SQLite drops the zone; we put UTC back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class DatabaseNow(FunctionElement[datetime]):
    """The database server's clock, offset by a number of seconds (see `db_now`)."""

    type = UTCDateTime()
    name = "db_now"
    inherit_cache = True


@compiles(DatabaseNow)
def _database_now(element: DatabaseNow, compiler: SQLCompiler, **kw: Any) -> str:  # PostgreSQL
    seconds = compiler.process(element.clauses, **kw)
    return f"(CURRENT_TIMESTAMP + make_interval(secs => CAST({seconds} AS DOUBLE PRECISION)))"


@compiles(DatabaseNow, "sqlite")
def _database_now_sqlite(element: DatabaseNow, compiler: SQLCompiler, **kw: Any) -> str:
    # The text SQLAlchemy stores a timestamp as on SQLite (UTC, microseconds), so that comparisons with stored
    # values hold; SQLite's clock has milliseconds.
    seconds = compiler.process(element.clauses, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('%.6f seconds', {seconds}))"


def db_now(seconds: float = 0.0) -> DatabaseNow:
    """The database server's current time plus `seconds` (negative: ago), as SQL: what heartbeats are written
    with and compared to, so that a host whose clock drifts neither loses its jobs to the reaper nor keeps a dead
    worker's."""
    return DatabaseNow(literal(float(seconds), Float()))


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class JobStatus(enum.StrEnum):
    """A job's states; how a job moves between them is app/jobs/state.py."""

    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    paused = "paused"


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
# Jobs that have not ended: their files must stay readable, they count against a tenant's active jobs, and what
# they reserved of its storage quota is held for them.
ACTIVE_STATUSES = frozenset({JobStatus.validating_files, JobStatus.queued, JobStatus.running, JobStatus.paused})


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # sha256 of the key: keys are 256-bit random tokens, so a fast hash is safe and lookups are O(1).
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class File(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(32))
    n_examples: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    # Tokens in the longest example (0: not measured); POST /jobs checks it against the worker's token budget.
    max_example_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The base model whose tokenizer counted n_tokens and max_example_tokens (null: uploaded before models had
    # their own tokenizers, counted with the built-ins' SmolLM2 tokenizer).
    tokenizer_model: Mapped[str | None] = mapped_column(String(64), default=None)
    # Whether a line declares tools or holds tool calls or results: jobs need a model with tool support.
    has_tools: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    storage_key: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    base_model: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(64))
    training_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    validation_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"), default=None)
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status", native_enum=False, length=32), default=JobStatus.validating_files
    )
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, default=None)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)  # written for the user: no internals
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    adapter_id: Mapped[str | None] = mapped_column(String(64), default=None)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Runs that ended with their worker lost (a stale heartbeat); graceful hand-backs do not count.
    lost_workers: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_event_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    # When it last entered the queue or the reaper last sent its task again (the database's clock): a job queued
    # for longer than `queued_resend_seconds` may have lost its task, and is sent again.
    queued_at: Mapped[datetime | None] = mapped_column(default=None)
    # What `POST /jobs` estimated it will store (checkpoints and artifact): held against the tenant's storage
    # quota, less what it has stored, while it is active.
    reserved_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # When its user asked to pause it while it ran: its worker checkpoints after the current step and pauses it.
    pause_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    # How many devices it trains on (`resources.devices`): one worker that owns at least as many runs its ranks.
    devices: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Where it trained, written when training starts: "cuda:0", "cpu", ...; "bfloat16", "float32", ...
    device: Mapped[str | None] = mapped_column(String(64), default=None)
    dtype: Mapped[str | None] = mapped_column(String(16), default=None)
    # The base model's revision when the job was created: a model registered again under its id is another model.
    base_model_revision: Mapped[str | None] = mapped_column(String(64), default=None)
    # The user's own key-value pairs (OpenAI's `metadata`: at most 16, short strings), returned as given.
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", default=None)


class JobEvent(Base):
    """Append-only log of a job: status changes, metrics, messages; `seq` orders them per job."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_id_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # The job that trained it; null for the sampler weights of a Tinker run (app/tinker/), named by `tinker_path`.
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), unique=True, default=None)
    tinker_path: Mapped[str | None] = mapped_column(String(400), default=None)
    base_model: Mapped[str] = mapped_column(String(200))
    base_model_revision: Mapped[str | None] = mapped_column(String(64), default=None)  # null: before revisions
    method: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    format: Mapped[str] = mapped_column(String(32), default="peft")
    storage_key: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TinkerRun(Base):
    """A training run of Tinker's protocol (app/tinker/): its id is the client's (`<session>:train:<n>`); the run
    itself lives in the memory of the API process that created it, this row is what lists it afterwards."""

    __tablename__ = "tinker_runs"
    __table_args__ = (Index("ix_tinker_runs_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    base_model: Mapped[str] = mapped_column(String(200))
    lora_rank: Mapped[int] = mapped_column(Integer)
    lora_config: Mapped[dict[str, Any]] = mapped_column(JSON)  # rank, seed, train_attn, train_mlp, train_unembed
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_request_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Its optimizer steps so far, the tokens they trained on and its loss curve (app/tinker/service.RunMetrics).
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default=text("'{}'"))
    # The API process whose memory holds the run (`host:pid`): its requests go there (app/tinker/service.HOLDER).
    holder: Mapped[str | None] = mapped_column(String(200), default=None)


class TinkerCheckpoint(Base):
    """Weights a Tinker run saved: `training` (save_state: the LoRA and AdamW's state, to resume exactly) or
    `sampler` (save_weights_for_sampler: the LoRA, for sampling). `tinker_path` is how the client names it.
    Sampler weights are also an adapter (`adapter_id`: the adapter row owns their files; deleting either deletes
    both)."""

    __tablename__ = "tinker_checkpoints"
    __table_args__ = (UniqueConstraint("tenant_id", "tinker_path"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    run_id: Mapped[str] = mapped_column(ForeignKey("tinker_runs.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[str | None] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), default=None)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128))
    tinker_path: Mapped[str] = mapped_column(String(400))
    storage_key: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)  # a time to live's end (then deleted)


class Checkpoint(Base):
    """A job's saved state at one step: the artifact there (served and downloaded like an adapter, by this id)
    and the recipe's whole state (`state_key`: weights, optimizer, scheduler, RNG, data position) to resume from.
    """

    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_step", "job_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What an adapter row has, so that /generate and downloads take a checkpoint id where an adapter id goes.
    base_model: Mapped[str] = mapped_column(String(200))
    base_model_revision: Mapped[str | None] = mapped_column(String(64), default=None)
    method: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(32))
    storage_key: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    state_key: Mapped[str] = mapped_column(String(1024))
    state_size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RegisteredModel(Base):
    """A base model an operator registered (`tuneforge models add`); its files are in the object store."""

    __tablename__ = "base_models"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(16))  # path | gguf | hf-repo
    origin: Mapped[str | None] = mapped_column(String(256), default=None)  # Hugging Face repo name, if known
    architecture: Mapped[str] = mapped_column(String(64))
    n_parameters: Mapped[int] = mapped_column(BigInteger)
    max_seq_length: Mapped[int] = mapped_column(Integer)
    chat_template: Mapped[bool] = mapped_column(Boolean)
    n_layers: Mapped[int | None] = mapped_column(Integer, default=None)  # transformer blocks
    # How its chat template writes tool calls (hermes, llama3_json, mistral); null: no tool support.
    tool_call_format: Mapped[str | None] = mapped_column(String(32), default=None)
    linear_modules: Mapped[list[str]] = mapped_column(JSON)
    default_target_modules: Mapped[list[str]] = mapped_column(JSON)
    revision: Mapped[str] = mapped_column(String(64))
    tokenizer_sha256: Mapped[str] = mapped_column(String(64))
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{path, sha256, size}]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FileTokenCount(Base):
    """Tokens of a file as one tokenizer counts them: measured at upload, and at `POST /jobs` for a job whose
    base model has another tokenizer (then kept, so the next job on that model does not read the file again)."""

    __tablename__ = "file_token_counts"

    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    tokenizer_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    max_example_tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """A client's `Idempotency-Key` on a creating request, and what it created: a retry returns that, for a day."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(16), primary_key=True)  # files | jobs
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str | None] = mapped_column(String(64), default=None)  # jobs: of the request body
    resource_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)  # expired keys are swept


class WebhookEndpoint(Base):
    """A URL a tenant registered to receive its jobs' events, signed with its own secret (app/webhooks/)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    name: Mapped[str] = mapped_column(String(200), default="")
    event_types: Mapped[list[str]] = mapped_column(JSON)
    # `whsec_` + base64 of 32 random bytes: the key deliveries are signed with (shown to the tenant once).
    secret: Mapped[str] = mapped_column(String(128))
    # The secret before a rotation that kept it valid: deliveries are signed with both until it expires.
    previous_secret: Mapped[str | None] = mapped_column(String(128), default=None)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)  # the last change of URL, events, name or secret


class WebhookDelivery(Base):
    """The outbox: one event for one endpoint, written in the transaction of the change it reports, sent (and
        retried) by the delivery loop of any API or worker process until the receiver answers 2xx or the retry window
        closes (`created_at` + the sender's `webhook_retry_seconds`). `id` is the `webhook-id` header, the same on every
    attempt. Times are the database's clock."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
        Index("ix_webhook_deliveries_status_next_attempt", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)  # the body as sent, byte for byte on every attempt
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Due when pending and this has passed; while an attempt is in flight, when another sender may try again.
    next_attempt_at: Mapped[datetime] = mapped_column()
    last_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(String(200), default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Worker(Base):
    """A training worker while it runs: what it can take (its devices), seen every `reaper_seconds`. A job that
    needs more devices than any worker seen within `heartbeat_timeout_seconds` owns says so in its events."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid
    devices: Mapped[int] = mapped_column(Integer)
    device_type: Mapped[str] = mapped_column(String(16))  # cuda or cpu
    trains_on_cuda: Mapped[bool] = mapped_column(default=False)  # takes the jobs that need CUDA (qlora)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class Eval(Base):
    """An evaluation in OpenAI's shape (app/evals/): the schema of its data items and the graders that score a
    model's answers; runs apply it to a model."""

    __tablename__ = "evals"
    __table_args__ = (Index("ix_evals_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(256), default="")
    data_source_config: Mapped[dict[str, Any]] = mapped_column()  # as answered: {"type": "custom", "schema": …}
    testing_criteria: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvalRun(Base):
    """One run of an eval on one model: its data items (validated and kept when it was created), how far it got
    (its output items), and which serving process holds it (`runner`, until `lease_until`; app/evals/runner.py)."""

    __tablename__ = "eval_runs"
    __table_args__ = (
        Index("ix_eval_runs_eval_created", "eval_id", "created_at"),
        Index("ix_eval_runs_status_lease", "status", "lease_until"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(256), default="")
    model: Mapped[str] = mapped_column(String(400), default="")
    data_source: Mapped[dict[str, Any]] = mapped_column()  # as the request gave it (inline items left out)
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{"item": {...}, "sample": {...}?}, ...]
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", default=None)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|in_progress|completed|failed|canceled
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(String(1000), default=None)
    runner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class EvalOutputItem(Base):
    """One data item of a run, answered and graded: `status` pass (every grader passed), fail, or error."""

    __tablename__ = "eval_output_items"
    __table_args__ = (UniqueConstraint("run_id", "datasource_item_id", name="uq_eval_output_items_run_id_item"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"))
    datasource_item_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(8))
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    sample: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Sweep(Base):
    """Several configurations (method × hyperparameters) trained as ordinary jobs on one training file, each
    scored by an objective and ranked (app/sweeps/); `spec` is the request as checked."""

    __tablename__ = "sweeps"
    __table_args__ = (Index("ix_sweeps_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(256), default="")
    spec: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)  # running|succeeded|failed|cancelled
    error: Mapped[str | None] = mapped_column(String(1000), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class SweepTrial(Base):
    """One configuration of a sweep: its job once started, how it ended, and its objective."""

    __tablename__ = "sweep_trials"
    __table_args__ = (UniqueConstraint("sweep_id", "position", name="uq_sweep_trials_sweep_id_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # its place in the request's configurations
    method: Mapped[str] = mapped_column(String(64))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column()
    planned_steps: Mapped[int] = mapped_column(Integer)  # its job's total steps, as planned when the sweep was made
    trainable_parameters: Mapped[int] = mapped_column(BigInteger)
    # pending | starting | running | evaluating (an eval objective's run) | succeeded | failed | cancelled | skipped
    status: Mapped[str] = mapped_column(String(16), default="pending")
    job_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    stopped_early_at: Mapped[int | None] = mapped_column(Integer, default=None)  # the rung step it was stopped at
    eval_run_id: Mapped[str | None] = mapped_column(String(64), default=None)  # an eval objective's run
    objective: Mapped[float | None] = mapped_column(Float, default=None)
    error: Mapped[str | None] = mapped_column(String(1000), default=None)


class SweepRung(Base):
    """A trial's validation loss at one rung of successive halving: what the next trials at that rung compare to."""

    __tablename__ = "sweep_rungs"
    __table_args__ = (UniqueConstraint("sweep_id", "step", "position", name="uq_sweep_rungs_sweep_id_step_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
