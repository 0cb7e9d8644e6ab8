"""`tuneforge up` supervises its children: a crashed API or worker (kill -9) is started again, after a delay that
grows while it keeps crashing; the other is left alone, and Ctrl-C still stops everything with exit code 0."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.auth.service import authenticate
from app.cli.supervisor import Supervised
from app.core.db import session_scope
from tests.conftest import free_port
from tests.test_e2e import TUNEFORGE, first_key, wait_healthy

STARTED = re.compile(r"started (api|worker) \(pid (\d+)\)")  # in a JSON log line's message (or a text one)
CELERY_READY = re.compile(r"celery@\S+ ready\.")


def started_pids(log: Path) -> dict[str, list[int]]:
    """Every pid `up` logged as started, per role, in order."""
    pids: dict[str, list[int]] = {"api": [], "worker": []}
    for role, pid in STARTED.findall(log.read_text(errors="replace")):
        pids[role].append(int(pid))
    return pids


def is_running(pid: int) -> bool:
    """Alive and not a zombie (exited but not reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(condition: Callable[[], bool], what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}\n{log.read_text()[-6000:]}"
        time.sleep(0.3)


def wait_started(log: Path, role: str, times: int) -> list[int]:
    wait_for(lambda: len(started_pids(log)[role]) >= times, f"{role} started {times} times", log, 15)
    return started_pids(log)[role]


def workers_ready(log: Path) -> int:
    return len(CELERY_READY.findall(log.read_text(errors="replace")))


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_up_restarts_a_crashed_api_and_worker_and_ctrl_c_stops_all(tmp_path: Path, model_cache_dir: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "TUNEFORGE_DATA_DIR": str(tmp_path / "data"),
        "TUNEFORGE_MODEL_CACHE_DIR": str(model_cache_dir),
        "TUNEFORGE_DEFAULT_BASE_MODEL": "tiny-random-llama",
        "TUNEFORGE_HOST": "127.0.0.1",
        "TUNEFORGE_PORT": str(port),
        "TUNEFORGE_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        # Its own process group, so that the `finally` can kill `up` and its children whatever happened.
        up = subprocess.Popen([*TUNEFORGE, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, [up])
        (api,), (worker,) = wait_started(log, "api", 1), wait_started(log, "worker", 1)
        # The worker is consuming the queue (Celery says so) before it is killed.
        wait_for(lambda: workers_ready(log) >= 1, "the worker is ready", log, 120)

        os.kill(api, signal.SIGKILL)
        new_api = wait_started(log, "api", 2)[1]
        assert new_api != api
        assert f"api (pid {api}) exited with signal SIGKILL; restarting in 1.0 s" in log.read_text()
        wait_healthy(url, [up], timeout=30)
        assert started_pids(log)["worker"] == [worker] and is_running(worker)

        os.kill(worker, signal.SIGKILL)
        new_worker = wait_started(log, "worker", 2)[1]
        assert new_worker != worker
        assert f"worker (pid {worker}) exited with signal SIGKILL; restarting in 1.0 s" in log.read_text()
        wait_for(lambda: workers_ready(log) >= 2, "the new worker is ready", log, 120)
        assert is_running(new_worker) and not is_running(worker)
        assert started_pids(log) == {"api": [api, new_api], "worker": [worker, new_worker]} and is_running(new_api)

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=40) == 0, log.read_text()[-6000:]
        assert not [pid for pid in (api, worker, new_api, new_worker) if is_running(pid)], log.read_text()[-6000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)
        up.wait(timeout=10)


def test_the_restart_delay_doubles_up_to_30_s_and_starts_over_after_a_minute_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tuneforge.up")
    crasher = Supervised("crasher", ["sh", "-c", "exit 3"])

    def crash_once(ran_for: float = 0.0) -> str:
        """Start, exit; returns what `up` logs about the exit."""
        crasher.start()
        assert crasher.process is not None
        crasher.process.wait(timeout=10)
        crasher.started_at -= ran_for
        caplog.clear()
        crasher.watch()
        assert crasher.restart_at is not None
        crasher.restart_at = time.monotonic()  # due now, instead of waiting for it
        return caplog.messages[-1]

    delays = [crash_once().rsplit(" in ", 1)[1] for _ in range(7)]
    assert delays == ["1.0 s", "2.0 s", "4.0 s", "8.0 s", "16.0 s", "30.0 s", "30.0 s"]
    message = crash_once(ran_for=61)
    assert re.fullmatch(r"crasher \(pid \d+\) exited with exit code 3; restarting in 1\.0 s", message), message

    caplog.clear()
    crasher.watch()  # the restart is due
    assert crasher.process is not None
    assert caplog.messages == [f"started crasher (pid {crasher.process.pid})"]
    crasher.process.wait(timeout=10)


def first_line_of_up(env: dict[str, str], log: Path, *, terminal: bool) -> str:
    """The first line `tuneforge up` prints on stdout (a pipe, or a terminal), then Ctrl-C; stderr goes to `log`."""
    import pty

    reader, writer = pty.openpty() if terminal else os.pipe()
    with log.open("ab") as err:
        up = subprocess.Popen([*TUNEFORGE, "up"], env=env, stdout=writer, stderr=err, start_new_session=True)
    os.close(writer)
    try:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(reader, 1)
            assert chunk, f"`up` printed nothing:\n{log.read_text()[-3000:]}"
            line += chunk
        return line.decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)
        up.wait(timeout=30)
        os.close(reader)


@pytest.mark.e2e
def test_the_first_key_is_kept_out_of_logs_and_shown_only_on_a_terminal(tmp_path: Path) -> None:
    """Where stdout is not a terminal (a container, a service manager, a file), whatever `up` prints ends in a
    log: the key goes to a file only its user reads, and the log holds no credential. A developer running `up` in
    a terminal still sees the key there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.update(TUNEFORGE_DATA_DIR=str(tmp_path / "logged"), TUNEFORGE_PORT=str(free_port()))
    log = tmp_path / "up.log"
    line = first_line_of_up(env, log, terminal=False)
    key = first_key(line, tmp_path / "logged")  # the line names the file, mode 0600, holding a key
    assert key not in log.read_text() and "tf_" not in log.read_text()
    with session_scope(f"sqlite:///{(tmp_path / 'logged').resolve() / 'tuneforge.db'}") as session:
        assert authenticate(session, authorization=f"Bearer {key}").name == "default"

    env["TUNEFORGE_DATA_DIR"] = str(tmp_path / "terminal")
    shown = first_line_of_up(env, log, terminal=True)
    assert re.fullmatch(r"Created tenant 'default'\. API key \(shown once\): tf_\S+\r?\n", shown), shown
    assert not (tmp_path / "terminal" / "first-api-key").exists()
