"""Thinking Machines' `tinker-cookbook` (0.6.1, unchanged) trains on Tuneforge offline with local data: its
supervised loop (`tinker_cookbook.supervised.train`, a chat file through `FromConversationFileBuilder`) and its RL
loop (`tinker_cookbook.rl.train`, a toy environment defined here), each in a process of its own that has only the
server's URL, a `tml-` key and `HF_ENDPOINT=<server>/hf` (the tokenizer comes from this server).

The cookbook is installed apart from the project (`make install-cookbook`: `pip install --no-deps --target
.venv/cookbook`), because its declared requirements cannot be met beside Tuneforge's: 0.6.1 asks for
`tml-renderers>=0.4.1`, which the package index does not have (0.2.1 serves the `role_colon` renderer used here),
and 0.5.x pins `transformers<=5.5.4`. The cookbook's processes run on the project's own packages otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import Tenant
from tests.test_tinker import server  # noqa: F401 (the live server fixture)

# Processes of their own; the embedded backend only (test_tinker.py covers the protocol on both).
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["embedded"], indirect=True)]

COOKBOOK = Path(__file__).resolve().parent.parent / ".venv" / "cookbook"

SUPERVISED = r"""
import asyncio, os, sys
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

url, key, data, log = sys.argv[1:5]
os.environ["TINKER_API_KEY"] = key
common = ChatDatasetBuilderCommonConfig(
    model_name_for_tokenizer="tiny-random-llama", renderer_name="role_colon", max_length=128, batch_size=2
)
config = train.Config(
    log_path=log, model_name="tiny-random-llama", recipe_name="tuneforge_test", renderer_name="role_colon",
    dataset_builder=FromConversationFileBuilder(file_path=data, common_config=common), learning_rate=2e-2,
    lora_rank=4, base_url=url, save_every=2, eval_every=0, infrequent_eval_every=0, num_epochs=4,
)
asyncio.run(train.main(config))
"""

RL = r"""
import asyncio, os, sys
import chz, tinker
from tinker_cookbook.rl import train
from tinker_cookbook.rl.types import Env, EnvGroupBuilder, RLDataset, RLDatasetBuilder, StepResult

url, key, log = sys.argv[1:4]
os.environ["TINKER_API_KEY"] = key
HALF_THE_VOCABULARY = 24576

class LowTokens(Env):
    # The reward: the share of the sampled tokens in the lower half of the vocabulary.
    async def initial_observation(self):
        return tinker.ModelInput.from_ints([1, 7, 12, 40]), []

    async def step(self, action, *, extra=None):
        reward = sum(token < HALF_THE_VOCABULARY for token in action) / max(1, len(action))
        return StepResult(reward=reward, episode_done=True, next_observation=tinker.ModelInput.from_ints([]),
                          next_stop_condition=[])

class Group(EnvGroupBuilder):
    async def make_envs(self):
        return [LowTokens() for _ in range(8)]

class Batches(RLDataset):
    def get_batch(self, index):
        return [Group(), Group()]

    def __len__(self):
        return 16

@chz.chz
class Builder(RLDatasetBuilder):
    async def __call__(self):
        return Batches(), None

config = train.Config(
    learning_rate=0.2, dataset_builder=Builder(), model_name="tiny-random-llama", recipe_name="tuneforge_test",
    max_tokens=6, log_path=log, eval_every=0, save_every=0, lora_rank=4, base_url=url, renderer_name="role_colon",
)
asyncio.run(train.main(config))
"""


def run_cookbook(script: str, url: str, key: str, tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    """The script in a process of its own; the metrics it logged (its log folder's metrics.jsonl)."""
    if not (COOKBOOK / "tinker_cookbook").is_dir():
        pytest.skip("tinker-cookbook is not installed: make install-cookbook")
    env = {
        **os.environ,
        "PYTHONPATH": str(COOKBOOK),
        "HF_ENDPOINT": f"{url}/hf",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "WANDB_MODE": "disabled",
    }
    log = tmp_path / "log"
    result = subprocess.run(
        [sys.executable, "-c", script, url, f"tml-{key}", *args, str(log)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]


def test_the_cookbooks_supervised_loop_trains_on_a_local_chat_file(
    server: tuple[str, FastAPI],  # noqa: F811
    tenant: Tenant,
    tmp_path: Path,
) -> None:
    data = tmp_path / "chats.jsonl"
    chats = [
        {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i} it is"}]}
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    metrics = run_cookbook(SUPERVISED, server[0], tenant.key, tmp_path, str(data))
    losses = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert len(losses) == 16  # 4 epochs of 4 batches
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    # Its final sampler weights are a Tuneforge adapter, served like any.
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {tenant.key}"}) as http:
        adapters = http.get("/adapters").json()["data"]
        final = next(a for a in adapters if (a["tinker_path"] or "").endswith("/sampler_weights/final"))
        answer = http.post("/generate", json={"adapter_id": final["id"], "prompt": "User: Say 3", "max_tokens": 4})
        assert answer.status_code == 200, answer.text


def test_the_cookbooks_rl_loop_raises_a_toy_reward(
    server: tuple[str, FastAPI],  # noqa: F811
    tenant: Tenant,
    tmp_path: Path,
) -> None:
    metrics = [m for m in run_cookbook(RL, server[0], tenant.key, tmp_path) if "env/all/reward/total" in m]
    rewards = [m["env/all/reward/total"] for m in metrics]
    assert len(rewards) == 16
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.2, rewards
    # The sampler's log-probabilities are the trainer's: the cookbook's own check of the two (its KL between the
    # sampled and the trained log-probabilities) is float noise on the first step, before any update.
    assert abs(metrics[0]["optim/kl_sample_train_v1"]) < 1e-4
