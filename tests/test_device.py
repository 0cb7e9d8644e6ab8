"""Devices and precision: TUNEFORGE_DEVICE / TUNEFORGE_DTYPE, mixed precision, out of memory, CUDA if present."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError
from safetensors.torch import load_file

from app.core.settings import Settings
from app.ml.device import PlacementError, resolve_placement
from app.ml.training import objectives
from tests.conftest import Tenant
from tests.test_worker import events, start_job
from worker.runner import run_training_job

needs_cuda = pytest.mark.cuda  # skipped without a GPU (tests/conftest.py); bench/gpu_check.py runs these
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")


@no_cuda
def test_auto_is_the_cpu_in_float32_without_a_gpu() -> None:
    placement = resolve_placement("auto", "auto")
    assert (placement.device_str, placement.dtype_str) == ("cpu", "float32")
    assert placement.describe().startswith("cpu (")
    assert resolve_placement("cpu", "bfloat16").dtype == torch.bfloat16


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_asking_for_cuda_without_one_says_so(device: str) -> None:
    with pytest.raises(PlacementError, match=f"TUNEFORGE_DEVICE={device} but no CUDA device is visible"):
        resolve_placement(device, "auto")


@pytest.mark.parametrize(("field", "value"), [("device", "gpu"), ("device", "cuda:x"), ("dtype", "float64")])
def test_settings_refuse_unknown_devices_and_dtypes(field: str, value: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(data_dir=tmp_path, **{field: value})


@no_cuda
@pytest.mark.e2e  # `tuneforge worker` and `tuneforge api`, in processes of their own
@pytest.mark.parametrize("command", ["worker", "api"])
def test_a_worker_or_api_asked_for_a_missing_gpu_exits_saying_why(command: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.update(TUNEFORGE_DATA_DIR=str(tmp_path), TUNEFORGE_DEVICE="cuda")
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", command], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "error: TUNEFORGE_DEVICE=cuda but no CUDA device is visible" in result.stderr


def adapter_tensors(client: TestClient, tenant: Tenant, adapter_id: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    archive = client.get(f"/adapters/{adapter_id}/download", headers=tenant.headers)
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(tmp_path / adapter_id, filter="data")
    return load_file(str(tmp_path / adapter_id / "adapter_model.safetensors"))


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
def test_a_half_precision_job_trains_float32_adapters_and_records_where_it_ran(
    dtype: str, client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    """Mixed precision on the CPU (what a GPU does): the base runs in half precision under autocast (float16 with
    a loss scaler), the trained LoRA weights stay float32, and the exported adapter is the same format as a
    float32 job's."""
    settings.dtype = dtype
    job_id = start_job(client, tenant, n_epochs=2, learning_rate=0.05)
    adapter_id = run_training_job(settings, job_id)
    assert adapter_id is not None
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert (job["device"], job["dtype"]) == ("cpu", dtype)
    first_log = next(e for e in events(client, tenant, job_id) if e["type"] == "log")
    assert first_log["message"].startswith("training on cpu (") and first_log["message"].endswith(f", {dtype}")
    assert first_log["data"]["dtype"] == dtype
    losses = [e["data"]["train_loss"] for e in events(client, tenant, job_id) if e["type"] == "metrics"]
    assert all(loss == loss and loss < 100 for loss in losses)  # finite: no overflow in half precision

    tensors = adapter_tensors(client, tenant, adapter_id, tmp_path)
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    assert any(t.abs().sum() > 0 for name, t in tensors.items() if "lora_B" in name)  # it trained


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_out_of_memory_fails_the_job_saying_what_to_lower_and_the_worker_goes_on(
    client: TestClient, tenant: Tenant, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = objectives.accumulate_gradients
    calls = {"n": 0}

    def out_of_memory_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:  # what torch raises when a CUDA allocation fails
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(objectives, "accumulate_gradients", out_of_memory_once)
    failed = start_job(client, tenant, batch_size=8, max_seq_length=256)
    assert run_training_job(settings, failed) is None
    job = client.get(f"/jobs/{failed}", headers=tenant.headers).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "out_of_memory"
    assert "ran out of device memory" in job["error"]["message"]
    assert "batch_size (now 8)" in job["error"]["message"] and "max_seq_length (now 256)" in job["error"]["message"]
    assert "CUDA" not in job["error"]["message"]  # no library internals

    following = start_job(client, tenant)
    assert run_training_job(settings, following) is not None  # the same worker process takes the next job
    assert client.get(f"/jobs/{following}", headers=tenant.headers).json()["status"] == "succeeded"


@needs_cuda
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_lora_job_trains_on_cuda(client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path) -> None:
    settings.device, settings.dtype = "cuda", "auto"
    lines = [json.dumps({"prompt": "The secret word is", "completion": " plum"})] * 8
    job_id = start_job(client, tenant, lines, n_epochs=8, learning_rate=0.05, target_modules="all-linear")
    adapter_id = run_training_job(settings, job_id)
    assert adapter_id is not None
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["device"].startswith("cuda:")
    tensors = adapter_tensors(client, tenant, adapter_id, tmp_path)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    out = client.post(
        "/generate",
        headers=tenant.headers,
        json={"adapter_id": adapter_id, "prompt": "The secret word is", "temperature": 0, "max_tokens": 2},
    )
    assert out.status_code == 200 and out.json()["text"].startswith(" plum"), out.text
