"""`tuneforge up`: everything on one machine, the API and a worker as child processes, restarted when they crash."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from app.cli.output import log_to_stderr
from app.cli.servers import check_placement
from app.core.settings import get_settings

log = logging.getLogger("tuneforge.up")  # what its log lines say, as the worker's say "tuneforge.worker"

# `up` restarts a child that exits on its own after RESTART_DELAY_MIN seconds, doubling the delay while it keeps
# crashing, up to RESTART_DELAY_MAX; a child that ran for STABLE_AFTER seconds starts again from the minimum.
RESTART_DELAY_MIN = 1.0
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 60.0
# Warm shutdown first: the API drains; the worker stops a running job at its next step and marks it failed
# with the reason. Then a cold shutdown (SIGQUIT), then SIGKILL for whatever is still alive: (signal, grace in s).
STOP_SEQUENCE = ((signal.SIGTERM, 10.0), (signal.SIGQUIT, 15.0), (signal.SIGKILL, 5.0))


def _describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exit code {returncode}"
    with contextlib.suppress(ValueError):
        return f"signal {signal.Signals(-returncode).name}"
    return f"signal {-returncode}"


@dataclass
class Supervised:
    """A child process of `up` (the API or the worker), restarted whenever it exits on its own."""

    role: str
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    delay: float = RESTART_DELAY_MIN  # before the next restart
    restart_at: float | None = None  # set while the child waits to be started again

    def start(self) -> None:
        self.process = subprocess.Popen(self.args)
        self.started_at, self.restart_at = time.monotonic(), None
        log.info("started %s (pid %d)", self.role, self.process.pid)

    def watch(self) -> None:
        """Schedule a restart when the child has exited; start it again when its delay has passed."""
        now = time.monotonic()
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start()
            return
        assert self.process is not None
        returncode = self.process.poll()
        if returncode is None:
            return
        if now - self.started_at >= STABLE_AFTER:
            self.delay = RESTART_DELAY_MIN
        log.warning(
            "%s (pid %d) exited with %s; restarting in %.1f s",
            self.role,
            self.process.pid,
            _describe_exit(returncode),
            self.delay,
        )
        self.restart_at = now + self.delay
        self.delay = min(2 * self.delay, RESTART_DELAY_MAX)


def _stop_all(children: list[Supervised]) -> None:
    for sig, grace in STOP_SEQUENCE:
        alive = [c.process for c in children if c.process is not None and c.process.poll() is None]
        for process in alive:
            process.send_signal(sig)
        deadline = time.monotonic() + grace
        for process in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))


FIRST_KEY_FILE = "first-api-key"  # in the data dir, when the first key is not shown on a terminal


def write_secret(path: Path, text: str) -> None:
    """Write `text` to a new file that only this user may read (mode 0600 from its creation, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a file left by an earlier database: O_EXCL creates ours afresh with our mode
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def create_first_key(data_dir: Path, db_url: str, *, show: bool) -> None:
    """On a database without tenants, create the tenant `default` and its API key: printed when `show`, else
    written to a file only this user reads (its path is printed, not the key), so that no log collects it."""
    from app.auth.service import count_tenants, create_api_key
    from app.core.db import session_scope

    with session_scope(db_url) as session:
        if count_tenants(session) != 0:
            return
        key = create_api_key(session, tenant_name="default")
        if not show:
            # Before the commit: a key that could not be written is not created either.
            write_secret(data_dir / FIRST_KEY_FILE, key + "\n")
    if show:
        typer.echo(f"Created tenant 'default'. API key (shown once): {key}")
    else:
        typer.echo(
            f"Created tenant 'default'. Its API key is in {data_dir / FIRST_KEY_FILE} (readable by this user only; "
            "delete the file once the key is kept elsewhere)"
        )


def up(
    host: Annotated[str | None, typer.Option(help="Bind address (default: TUNEFORGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: TUNEFORGE_PORT)")] = None,
    devices: Annotated[
        str | None,
        typer.Option(help="The worker's devices, as `tuneforge worker --devices` (default: TUNEFORGE_WORKER_DEVICES)"),
    ] = None,
    show_key: Annotated[
        bool | None,
        typer.Option(
            "--show-key/--no-show-key",
            help="Print the first API key (default: only when stdout is a terminal, which no log keeps); otherwise "
            f"it is written to <TUNEFORGE_DATA_DIR>/{FIRST_KEY_FILE} (mode 0600) and only that path is printed",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run everything on this machine: migrate, then the API and one worker. Ctrl-C (or SIGTERM) stops both; a
    running job is checkpointed and queued again, and the next `tuneforge up` resumes it.

    A crashed API or worker (any exit of its own, even kill -9) is restarted; starts, exits and restarts go to stderr.

    The restart waits 1 s, doubling while the child keeps crashing (at most 30 s), back to 1 s after a minute up.

    On first start (no tenant yet) it creates the tenant `default` and its API key (where it goes: see --show-key).
    """
    from app.core.db import migrate as run_migrations

    log_to_stderr()
    check_placement()
    settings = get_settings()
    run_migrations(settings.db_url)
    create_first_key(settings.data_dir, settings.db_url, show=sys.stdout.isatty() if show_key is None else show_key)
    log.info("Tuneforge on http://%s:%s  data: %s", host or settings.host, port or settings.port, settings.data_dir)
    me = [sys.executable, "-m", "app.cli"]
    api_args = [*me, "api"] + (["--host", host] if host else []) + (["--port", str(port)] if port else [])
    worker_args = [*me, "worker"] + (["--devices", devices] if devices else [])
    children = [Supervised("api", api_args), Supervised("worker", worker_args)]

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    # Before the children start, so that no signal can leave them running without us.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for child in children:
        child.start()
    while not stopping:
        for child in children:
            if not stopping:
                child.watch()
        time.sleep(0.5)
    log.info("stopping the API and the worker")
    _stop_all(children)
