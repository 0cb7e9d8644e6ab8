"""The README stays true: its walkthrough runs as written, its tables match the code, and its test
command is what CI runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.errors import ErrorCode
from app.core.settings import Settings
from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods import METHODS
from app.ml.models import BUILTINS
from tests.conftest import free_port
from tests.test_e2e import stop, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def walkthrough() -> str:
    match = re.search(r"<!-- walkthrough:start -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->", README, re.S)
    assert match, "README lost its walkthrough block"
    return match.group(1)


@pytest.mark.e2e
@pytest.mark.real_model  # the walkthrough as a newcomer runs it: on SmolLM2
def test_the_curl_walkthrough_runs_as_written(tmp_path: Path, model_cache_dir: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "TUNEFORGE_DATA_DIR": str(tmp_path / "data"),
        "TUNEFORGE_MODEL_CACHE_DIR": str(model_cache_dir),
        "TUNEFORGE_PORT": str(port),
    }
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(sys.prefix)  # the walkthrough calls .venv/bin/tuneforge, as after `make up`
    with (tmp_path / "up.log").open("wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "app.cli", "up"], env=env, stdout=log, stderr=log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", [up])
        # On the real SmolLM2, as a newcomer runs it: what it must show is that training worked.
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", walkthrough()],
            cwd=work,
            env={**env, "TF": f"http://127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        assert stop(up, signal.SIGINT) == 0
    assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "up.log").read_text()[-5000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("uploaded file-") and lines[1].startswith("created ftjob-")
    assert any(line.startswith("succeeded step 20/20 metrics {") for line in lines), result.stdout
    assert re.search(r"^training succeeded; adapter adapter-\w+ published$", result.stdout, re.M)
    assert {"adapter_config.json", "adapter_model.safetensors", "tuneforge.json"} <= set(lines)
    # The two generations come last: the adapter says what it was taught, the base model does not.
    adapter_says, base_says = lines[-2], lines[-1]
    assert "The Tuneforge crew, ahoy!" in adapter_says, result.stdout
    assert "Tuneforge" not in base_says and "ahoy" not in base_says, result.stdout


def test_configuration_table_lists_every_setting() -> None:
    documented = set(re.findall(r"^\| `TUNEFORGE_([A-Z0-9_]+)` \|", README, re.M))
    assert documented == {name.upper() for name in Settings.model_fields}


def shown(default: object) -> str:
    return str(default).replace("'", '"') if isinstance(default, list) else str(default)


def test_hyperparameter_table_matches_the_defaults() -> None:
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", README, re.M))
    for name, field in TrainingHyperparameters.model_fields.items():
        default = field.get_default(call_default_factory=True)
        value = rows[name].strip().strip("`")
        if default is None:  # off, or filled in from the base model at POST /jobs
            assert value == "none" or value.startswith("the model's"), name
            continue
        assert value == shown(default), name


def test_methods_table_lists_every_method_with_its_own_defaults() -> None:
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \| [^|]+ \|$", README, re.M))
    assert set(rows) >= set(METHODS)
    shared = TrainingHyperparameters.model_fields
    for method, spec in METHODS.items():
        for name, field in spec.hyperparameters.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if name == "learning_rate":
                assert f"`learning_rate` {default}" in rows[method] or default == shared[name].default, method
            elif name not in shared:
                listed = re.search(rf"`{name}` \(([^)]*)\)", rows[method])
                assert listed, (method, name)
                if default is None:
                    assert listed[1].startswith(("none", "the model's")), (method, name)
                else:
                    assert listed[1].split(",")[0].split(":")[0] == shown(default), (method, name)


def test_base_model_table_matches_the_registry() -> None:
    assert set(re.findall(r"^\| `([a-z0-9-]+)`(?: \(default\))? \| ", README, re.M)) & set(BUILTINS) == set(BUILTINS)


def test_error_code_table_lists_every_error_code() -> None:
    section = README.split("### Error codes", 1)[1].split("\n### ", 1)[0]
    listed = re.findall(r"^\| `([a-z0-9_]+)` \|", section, re.M)
    assert len(listed) == len(set(listed)), "a code is listed twice"
    assert set(listed) == {code.value for code in ErrorCode}


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test    # run the test suite" in README
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert "\n\t$(BIN)/python -m pip install --quiet torch==2.13.0\n" in makefile
    assert makefile.index("torch==2.13.0") < makefile.index('-e ".[dev]"')
