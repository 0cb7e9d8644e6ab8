"""Tinker's protocol, driven by the official `tinker` client (unchanged, pointed at a live Tuneforge with
`base_url` and `tml-<key>`): the handshake and capabilities, a session kept by heartbeats and closed when its
client goes silent, and a LoRA trained step by step — forward/backward with each built-in loss and a custom one,
AdamW steps — with every number checked against the same computation done here."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import httpx
import pytest
import tinker
import torch
from fastapi import FastAPI
from tinker import types

from app.core.errors import InvalidInput
from app.core.settings import Settings
from app.main import create_app
from app.ml.models import BUILTINS, ModelStore
from app.tinker.service import Run, TinkerService
from tests.conftest import Tenant, jsonl, live, tenant_id, upload
from worker.runner import run_training_job

TOKENS = [1, 7, 12, 40, 3, 99, 150, 61, 8, 22]


@pytest.fixture
def server(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    limits = {"tinker_poll_seconds": 2.0, "tinker_session_timeout_seconds": 30.0, "tinker_max_runs_per_tenant": 3}
    app = create_app(settings.model_copy(update=limits))
    with live(app) as url:
        yield url, app


@pytest.fixture
def service(server: tuple[str, FastAPI], tenant: Tenant) -> Iterator[Any]:
    client = tinker.ServiceClient(base_url=server[0], api_key=f"tml-{tenant.key}")
    yield client
    with contextlib.suppress(tinker.APIStatusError):  # its session closed already (410)
        client.close("success").result()


def datum(**inputs: Any) -> Any:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], **inputs},
    )


def base_logprobs(settings: Settings) -> torch.Tensor:
    """The base model's log-probabilities of TOKENS[1:] given TOKENS[:-1], computed here."""
    model = ModelStore(settings.models_dir, None).load(BUILTINS["tiny-random-llama"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([TOKENS[:-1]])).logits.float()
    return torch.log_softmax(logits, -1)[0].gather(-1, torch.tensor(TOKENS[1:]).unsqueeze(-1)).squeeze(-1)


def test_capabilities_and_keys(server: tuple[str, FastAPI], service: Any, tenant: Tenant) -> None:
    capabilities = service.get_server_capabilities()
    names = [m.model_name for m in capabilities.supported_models]
    assert "tiny-random-llama" in names and "smollm2-135m-instruct" in names
    with (
        pytest.raises(tinker.AuthenticationError),
        tinker.ServiceClient(base_url=server[0], api_key="tml-tf_not_a_key") as wrong,
    ):
        wrong.get_server_capabilities()


def test_a_lora_trains_step_by_step_with_each_loss(service: Any, settings: Settings) -> None:
    training = service.create_lora_training_client(base_model="tiny-random-llama", rank=4, seed=0).result()
    info = training.get_info()
    assert info.model_data.model_name == "tiny-random-llama" and info.lora_rank == 4

    # A fresh LoRA changes nothing: the first pass's log-probabilities are the base model's.
    expected = base_logprobs(settings)
    first = training.forward([datum(weights=[1.0] * 9)], "cross_entropy").result()
    got = first.loss_fn_outputs[0]["logprobs"].to_torch()
    assert torch.allclose(got, expected, atol=1e-5)
    assert first.metrics["loss:sum"] == pytest.approx(float(-expected.sum()), rel=1e-5)

    # Weights select what is learned: the loss is the weighted sum.
    weights = [0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.5]
    weighted = training.forward([datum(weights=weights)], "cross_entropy").result()
    assert weighted.metrics["loss:sum"] == pytest.approx(float(-(expected * torch.tensor(weights)).sum()), rel=1e-5)

    # Importance sampling and PPO against the sampler's log-probabilities, as Tinker defines them.
    sampler = (expected - 0.3).tolist()
    advantages = [1.0, -1.0, 0.5, 2.0, -0.5, 1.0, 0.0, 1.0, -2.0]
    ratio = torch.exp(torch.tensor(0.3))
    ist = training.forward([datum(logprobs=sampler, advantages=advantages)], "importance_sampling").result()
    assert ist.metrics["loss:sum"] == pytest.approx(float(-(ratio * torch.tensor(advantages)).sum()), rel=1e-4)
    ppo = training.forward(
        [datum(logprobs=sampler, advantages=advantages)], "ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    ).result()
    a = torch.tensor(advantages)
    clipped = -torch.minimum(ratio * a, ratio.clamp(0.9, 1.1) * a).sum()
    assert ppo.metrics["loss:sum"] == pytest.approx(float(clipped), rel=1e-4)

    # Steps: forward/backward then AdamW, submitted without waiting (run in order); the loss falls.
    losses = []
    for _ in range(8):
        step = training.forward_backward([datum(weights=[1.0] * 9)], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=0.05))
        losses.append(step.result().metrics["loss:sum"])
    assert losses[-1] < 0.5 * losses[0], losses

    # A custom loss, computed by the client from the log-probabilities it gets (two passes here).
    def loss_fn(data: list[Any], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = -logprobs[0][-3:].sum()
        return loss, {"last_three:sum": float(loss)}

    custom = training.forward_backward_custom([datum(weights=[1.0] * 9)], loss_fn).result()
    assert "last_three:sum" in custom.metrics and custom.metrics["loss:sum"] > 0


def test_a_session_whose_client_goes_silent_is_closed_and_frees_its_run(
    server: tuple[str, FastAPI], service: Any, tenant: Tenant
) -> None:
    training = service.create_lora_training_client(base_model="tiny-random-llama", rank=2).result()
    training.get_info()
    state = server[1].state.tinker
    [session] = [s for s in state.sessions.values() if s.tenant_id != ""]
    assert len(state.runs) == 1
    assert state.expire(time.monotonic() + 1.0) == []  # heartbeats keep it
    assert state.expire(time.monotonic() + 3600) == [session.id]  # silent for longer than the timeout
    assert state.runs == {}
    with pytest.raises(Exception, match="its session closed|unknown"):
        training.forward([datum(weights=[1.0] * 9)], "cross_entropy").result()


def test_samples_come_from_the_trained_weights_through_the_serving_engine(
    server: tuple[str, FastAPI], service: Any, tenant: Tenant
) -> None:
    training = service.create_lora_training_client(base_model="tiny-random-llama", rank=4, seed=1).result()
    prompt = types.ModelInput.from_ints(TOKENS[:4])
    params = types.SamplingParams(max_tokens=6, temperature=0.0)
    base = service.create_sampling_client(base_model="tiny-random-llama")
    before = base.sample(prompt, 1, params).result().sequences[0].tokens

    # Teach the run one continuation, then sample from its weights: greedy decoding writes what it learned.
    taught = [*TOKENS[:4], 5, 5, 5, 5, 5, 5]
    lesson = types.Datum(
        model_input=types.ModelInput.from_ints(taught[:-1]),
        loss_fn_inputs={"target_tokens": taught[1:], "weights": [0.0] * 3 + [1.0] * 6},
    )
    for _ in range(25):
        training.forward_backward([lesson], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=0.05))
    sampling = training.save_weights_and_get_sampling_client().result()
    answer = sampling.sample(prompt, 2, params).result()
    assert len(answer.sequences) == 2
    for sequence in answer.sequences:
        assert sequence.tokens == [5] * 6 and sequence.stop_reason == "length"
        assert sequence.logprobs is not None and len(sequence.logprobs) == 6
        assert all(lp > -0.5 for lp in sequence.logprobs)  # learned: likely
    assert before != [5] * 6
    # The prompt's log-probabilities under the sampled weights: those the run computes (its weights unchanged since).
    scored = sampling.compute_logprobs(types.ModelInput.from_ints(taught)).result()
    assert scored[0] is None and len(scored) == len(taught)
    reference = training.forward([lesson], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
    assert torch.allclose(torch.tensor(scored[1:]), reference, atol=1e-4)
    # The same weights by name, from another client of the session.
    saved = training.save_weights_for_sampler("taught").result()
    assert saved.path.endswith(":train:0/sampler_weights/taught") and saved.path.startswith("tinker://")
    named = service.create_sampling_client(model_path=saved.path)
    assert named.sample(prompt, 1, params).result().sequences[0].tokens == [5] * 6
    # The saved weights are an adapter like any other: /generate and OpenAI's chat completions serve them.
    state = server[1].state
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {tenant.key}"}) as http:
        generated = http.post(
            "/generate", json={"adapter_id": saved.path, "prompt": "x", "max_tokens": 2, "temperature": 0}
        )
        assert generated.status_code == 200, generated.text
        assert generated.json()["base_model"] == "tiny-random-llama"
        chat = http.post(
            "/v1/chat/completions",
            json={"model": saved.path, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2},
        )
        assert chat.status_code == 200, chat.text
        other = http.post("/generate", json={"adapter_id": saved.path.replace("taught", "nope"), "prompt": "x"})
        assert other.status_code == 404
    assert state.engine is not None
    # Sampled at temperature 1 with a seed: the same seed, the same samples.
    hot = types.SamplingParams(max_tokens=5, temperature=1.0, seed=7)
    first = [s.tokens for s in named.sample(prompt, 3, hot).result().sequences]
    assert first == [s.tokens for s in named.sample(prompt, 3, hot).result().sequences]


def test_a_saved_state_resumes_exactly_and_runs_and_checkpoints_are_listed(
    server: tuple[str, FastAPI], service: Any, tenant: Tenant
) -> None:
    training = service.create_lora_training_client(base_model="tiny-random-llama", rank=4, seed=3).result()
    one = datum(weights=[1.0] * 9)
    adam = types.AdamParams(learning_rate=0.02)
    for _ in range(2):
        training.forward_backward([one], "cross_entropy")
        training.optim_step(adam)
    saved = training.save_state("two-steps").result()
    assert saved.path.endswith(":train:0/weights/two-steps")
    # The original goes on one step; a run made from the state with AdamW's state does the same step.
    training.forward_backward([one], "cross_entropy")
    training.optim_step(adam).result()
    after = training.forward([one], "cross_entropy").result()
    resumed = service.create_training_client_from_state_with_optimizer(saved.path)
    resumed.forward_backward([one], "cross_entropy")
    resumed.optim_step(adam).result()
    again = resumed.forward([one], "cross_entropy").result()
    assert again.metrics["loss:sum"] == pytest.approx(after.metrics["loss:sum"], rel=1e-5)
    assert torch.allclose(
        again.loss_fn_outputs[0]["logprobs"].to_torch(), after.loss_fn_outputs[0]["logprobs"].to_torch(), atol=1e-5
    )
    # Without AdamW's state the same step lands elsewhere (fresh moments).
    weights_only = service.create_training_client_from_state(saved.path)
    weights_only.forward_backward([one], "cross_entropy")
    weights_only.optim_step(adam).result()
    other = weights_only.forward([one], "cross_entropy").result()
    assert other.metrics["loss:sum"] != pytest.approx(after.metrics["loss:sum"], rel=1e-5)

    # The REST client lists the runs and their checkpoints, downloads one (PEFT's files) and deletes it.
    training.save_weights_for_sampler("for-sampling").result()
    rest = service.create_rest_client()
    runs = rest.list_training_runs().result()
    assert training.model_id in [r.training_run_id for r in runs.training_runs]
    listed = rest.list_checkpoints(training.model_id).result().checkpoints
    assert sorted((c.checkpoint_type, c.checkpoint_id) for c in listed) == [
        ("sampler", "sampler_weights/for-sampling"),
        ("training", "weights/two-steps"),
    ]
    archive = httpx.get(
        f"{server[0]}/api/v1/training_runs/{training.model_id}/checkpoints/weights/two-steps/archive",
        headers={"X-API-Key": f"tml-{tenant.key}"},
    )
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= set(tar.getnames())
    rest.delete_checkpoint_from_tinker_path(saved.path).result()
    assert [c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result().checkpoints] == [
        "sampler_weights/for-sampling"
    ]


@pytest.mark.slow  # a client process of its own
def test_get_tokenizer_loads_the_registered_models_tokenizer_from_this_server(
    server: tuple[str, FastAPI], tenant: Tenant, settings: Settings, tmp_path: Any
) -> None:
    """`HF_ENDPOINT=<server>/hf` is all the client needs: the tokenizer comes from here, never from outside (the
    variable is read when huggingface_hub is imported: a process of its own)."""
    script = (
        "import json, sys, tinker\n"
        "service = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])\n"
        "training = service.create_lora_training_client(base_model='tiny-random-llama', rank=2).result()\n"
        "tokenizer = training.get_tokenizer()\n"
        "print(json.dumps(tokenizer.encode('Name fruit number 3.', add_special_tokens=False)))\n"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": f"{server[0]}/hf",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", script, server[0], f"tml-{tenant.key}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = ModelStore(settings.models_dir, None).tokenizer(BUILTINS["tiny-random-llama"])
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected.encode(
        "Name fruit number 3.", add_special_tokens=False
    )
    # A model this server does not have is the hub's "repository not found", not an error of the server.
    missing = httpx.head(f"{server[0]}/hf/no-such-model/resolve/main/tokenizer.json")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "RepoNotFound"


def test_a_runs_requests_run_in_seq_id_order_whatever_order_they_arrive_in(settings: Settings) -> None:
    service = TinkerService(settings, ModelStore(settings.models_dir, None))
    run = Run("s:train:0", "tenant", "s", "tiny-random-llama", 2, lora=cast(Any, object()), expected=1)
    threading.Thread(target=service._serve_run, args=(run,), daemon=True).start()
    order: list[int] = []

    def step(seq: int) -> Callable[[Any], int]:
        return lambda _: order.append(seq) or seq

    ids = {seq: service.submit(run, seq, "ForwardBackward", step(seq)) for seq in (3, 1, 4, 2)}
    assert service.submit(run, 3, "ForwardBackward", step(99)) == ids[3]  # a re-sent request: the same one
    results = [service.future("tenant", ids[seq]).future.result(timeout=10) for seq in (1, 2, 3, 4)]
    assert order == [1, 2, 3, 4] and results == [1, 2, 3, 4]
    assert service.submit(run, 2, "ForwardBackward", step(2)) == ids[2]  # re-sent after it ran: its result
    with pytest.raises(InvalidInput, match="has run already"):
        service.submit(run, 0, "ForwardBackward", step(0))  # its creation's turn, long past
    service.close_session("s", "test")  # no such session: nothing happens


@pytest.mark.slow  # twelve rounds of sampling and training
def test_an_importance_sampling_loop_raises_a_toy_reward(service: Any) -> None:
    """RL as Tinker's cookbook does it: sample from the current weights, score, then an importance-sampling step
    with the advantages on the sampled tokens (the sampler's log-probabilities beside them). The reward — the share
    of sampled tokens in the lower half of the vocabulary — rises."""
    training = service.create_lora_training_client(base_model="tiny-random-llama", rank=8, seed=0).result()
    prompt = TOKENS[:3]
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=0)
    vocabulary = 49152

    def reward(tokens: list[int]) -> float:
        return sum(token < vocabulary // 2 for token in tokens) / len(tokens)

    means = []
    for iteration in range(12):
        sampler = training.save_weights_and_get_sampling_client().result()
        samples = sampler.sample(
            types.ModelInput.from_ints(prompt), 16, params.model_copy(update={"seed": iteration})
        ).result()
        rewards = [reward(s.tokens) for s in samples.sequences]
        means.append(sum(rewards) / len(rewards))
        baseline = means[-1]
        data = []
        for sequence in samples.sequences:
            full = prompt + sequence.tokens
            n = len(full) - 1
            sampled = [0.0] * (len(prompt) - 1) + list(sequence.logprobs or [])
            # Each token's own part of the reward, less the batch's mean (a per-token advantage).
            advantage = [0.0] * (len(prompt) - 1) + [float(t < vocabulary // 2) - baseline for t in sequence.tokens]
            data.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(full[:-1]),
                    loss_fn_inputs={"target_tokens": full[1:], "logprobs": sampled[:n], "advantages": advantage[:n]},
                )
            )
        training.forward_backward(data, "importance_sampling")
        training.optim_step(types.AdamParams(learning_rate=0.1)).result()
    assert sum(means[-3:]) / 3 > sum(means[:3]) / 3 + 0.2, means


def test_runs_on_one_base_model_share_its_weights_and_train_apart(server: tuple[str, FastAPI], service: Any) -> None:
    first = service.create_lora_training_client(base_model="tiny-random-llama", rank=4, seed=0).result()
    second = service.create_lora_training_client(base_model="tiny-random-llama", rank=2, seed=1).result()
    one = datum(weights=[1.0] * 9)
    before = second.forward([one], "cross_entropy").result().metrics["loss:sum"]
    for _ in range(5):
        first.forward_backward([one], "cross_entropy")
        first.optim_step(types.AdamParams(learning_rate=0.05))
    trained = first.forward([one], "cross_entropy").result().metrics["loss:sum"]
    assert trained < before * 0.9  # the first learned...
    assert second.forward([one], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(before, rel=1e-6)
    state = server[1].state.tinker
    bases = list(state._bases.values())
    assert len(bases) == 1 and bases[0].runs == 2  # ...on the one copy of the base weights both runs use
    runs = [state.runs[first.model_id].lora, state.runs[second.model_id].lora]
    assert runs[0].shared is runs[1].shared and runs[0].trainable_parameters > runs[1].trainable_parameters


def test_a_batch_larger_than_a_request_may_be_is_split_by_the_client(
    server: tuple[str, FastAPI], service: Any, settings: Settings
) -> None:
    """The server's token bound reaches the client through its config: a batch past it is sent as several
    requests (run in order), and the result is the whole batch's."""
    bound = settings.model_copy(update={"tinker_max_batch_tokens": 64})
    server[1].state.settings = bound
    training = service.create_lora_training_client(base_model="tiny-random-llama", rank=2).result()
    data = [datum(weights=[1.0] * 9) for _ in range(12)]  # 108 tokens: more than one request of 64
    result = training.forward(data, "cross_entropy").result()
    single = training.forward(data[:1], "cross_entropy").result()
    assert len(result.loss_fn_outputs) == 12
    assert result.metrics["loss:sum"] == pytest.approx(12 * single.metrics["loss:sum"], rel=1e-4)


def test_a_pass_in_the_recipes_micro_batches_equals_one_batch(settings: Settings) -> None:
    """The runs' passes go in the recipe's micro-batches under the token budget: a request split into several (a
    budget of 64 tokens) gives the same log-probabilities, loss and gradients as one micro-batch (4096), and the
    same AdamW step (the recipe's `optimizer_step`, clipping included)."""
    from app.ml.device import resolve_placement
    from app.ml.training.stepwise import Example, LoraRun, SharedBase

    placement = resolve_placement("cpu", "float32")
    lengths = [5, 9, 17, 31, 12, 40]
    examples = [
        Example(
            [(7 * i + 3 * j) % 200 + 1 for j in range(n)],
            {
                "target_tokens": torch.tensor([(5 * i + j) % 200 + 1 for j in range(n)]),
                "weights": torch.linspace(1.0, 0.2, n),
            },
        )
        for i, n in enumerate(lengths)
    ]
    outcomes = []
    for budget in (64, 4096):
        model = ModelStore(settings.models_dir, None).load(BUILTINS["tiny-random-llama"], placement)
        shared = SharedBase(model, placement, max_batch_tokens=budget)
        assert shared.max_batch_tokens == budget
        run = LoraRun(shared, "run", rank=4, seed=3)
        with torch.no_grad():  # B away from zero, so that the LoRA's gradients are all nonzero
            for parameter in run.trainable:
                parameter.add_(0.01)
        result = run.forward_backward(examples, "cross_entropy", {})
        grads = [p.grad.clone() for p in run.trainable]
        # (An eps well above the gradients' float noise: Adam's first step is otherwise lr x their sign.)
        metrics = run.optim_step(learning_rate=1e-3, eps=1e-3, grad_clip_norm=0.5)
        outcomes.append((result, grads, [p.detach().clone() for p in run.trainable], metrics))
    (split, split_grads, split_after, split_metrics), (whole, whole_grads, whole_after, whole_metrics) = outcomes
    assert [len(lp) for lp in split.logprobs] == lengths  # in the request's order, whatever the grouping
    for a, b in zip(split.logprobs, whole.logprobs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert split.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-5)
    for a, b in zip(split_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert split_metrics["grad_norm:mean"] == pytest.approx(whole_metrics["grad_norm:mean"], rel=1e-4)
    for a, b in zip(split_after, whole_after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sampler_weights_are_an_adapter_and_a_runs_curve_is_kept(
    server: tuple[str, FastAPI], service: Any, tenant: Tenant, settings: Settings, tmp_path: Any
) -> None:
    """Named sampler weights are a Tuneforge adapter: listed in /adapters and /v1/models, downloadable in PEFT's
    format (PEFT's own loader computes what the run computes), served by their adapter id as by their path, and
    deleted from both sides by either; a run's steps and loss curve are in /training_runs (the dashboard's)."""
    from peft import PeftModel

    training = service.create_lora_training_client(base_model="tiny-random-llama", rank=4, seed=5).result()
    weights = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0]
    losses = []
    for _ in range(3):
        losses.append(training.forward_backward([datum(weights=weights)], "cross_entropy").result())
        training.optim_step(types.AdamParams(learning_rate=0.02)).result()
    saved = training.save_weights_for_sampler("published").result()
    reference = training.forward([datum(weights=weights)], "cross_entropy").result()
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {tenant.key}"}) as http:
        run = http.get(f"/training_runs/{training.model_id}").json()
        assert run["steps"] == 3 and run["trained_tokens"] == 3 * (len(TOKENS) - 1)
        expected = [[i + 1, r.metrics["loss:sum"] / sum(weights)] for i, r in enumerate(losses)]
        assert [step for step, _ in run["loss"]] == [1, 2, 3]
        assert [loss for _, loss in run["loss"]] == pytest.approx([loss for _, loss in expected], rel=1e-4)
        (checkpoint,) = run["checkpoints"]
        adapter_id = checkpoint["adapter_id"]
        assert checkpoint["tinker_path"] == saved.path and adapter_id.startswith("adapter-")
        assert [r["id"] for r in http.get("/training_runs").json()["data"]] == [training.model_id]

        adapter = http.get(f"/adapters/{adapter_id}").json()
        assert adapter["tinker_path"] == saved.path and adapter["job_id"] is None
        assert (adapter["base_model"], adapter["method"], adapter["format"]) == ("tiny-random-llama", "lora", "peft")
        assert adapter_id in [a["id"] for a in http.get("/adapters").json()["data"]]
        assert {"id": adapter_id, "parent": "tiny-random-llama"}.items() <= next(
            m for m in http.get("/v1/models").json()["data"] if m["id"] == adapter_id
        ).items()

        # PEFT's loader, on the downloaded archive, gives the log-probabilities the run gives.
        download = http.get(f"/adapters/{adapter_id}/download")
        assert download.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
            tar.extractall(tmp_path, filter="data")
        base = ModelStore(settings.models_dir, None).load(BUILTINS["tiny-random-llama"])
        model = PeftModel.from_pretrained(base, str(tmp_path))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([TOKENS[:-1]])).logits.float()
        logprobs = torch.log_softmax(logits, -1)[0].gather(-1, torch.tensor(TOKENS[1:]).unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(logprobs, reference.loss_fn_outputs[0]["logprobs"].to_torch(), atol=1e-4)

        # Served by its adapter id as by its path.
        ask = {"prompt": "x y", "max_tokens": 4, "temperature": 0}
        by_id = http.post("/generate", json={**ask, "adapter_id": adapter_id}).json()
        assert by_id["text"] == http.post("/generate", json={**ask, "adapter_id": saved.path}).json()["text"]

        # Deleted as an adapter: gone from the run's checkpoints too, and its files with it.
        assert http.delete(f"/adapters/{adapter_id}").status_code == 200
        rest = service.create_rest_client()
        assert rest.list_checkpoints(training.model_id).result().checkpoints == []
        assert http.post("/generate", json={**ask, "adapter_id": saved.path}).status_code == 404
        # Deleted as a Tinker checkpoint: gone as an adapter too.
        again = training.save_weights_for_sampler("again").result()
        second = http.get(f"/training_runs/{training.model_id}").json()["checkpoints"][0]["adapter_id"]
        assert http.get(f"/adapters/{second}").status_code == 200
        rest.delete_checkpoint_from_tinker_path(again.path).result()
        assert http.get(f"/adapters/{second}").status_code == 404
        assert http.get(f"/adapters/{second}/download").status_code == 404
    assert server[1].state.storage.list_keys("tinker/") == []  # both deletions took the files


def test_saved_weights_count_against_the_tenants_storage_quota(settings: Settings, tenant: Tenant) -> None:
    """Weights a run saves are stored bytes like any: past the tenant's quota the save fails with the quota's
    message (and nothing of it is kept); the run goes on."""
    app = create_app(settings.model_copy(update={"max_stored_bytes_per_tenant": 4096}))
    with live(app) as url, tinker.ServiceClient(base_url=url, api_key=f"tml-{tenant.key}") as client:
        training = client.create_lora_training_client(base_model="tiny-random-llama", rank=4, seed=0).result()
        with pytest.raises(Exception, match="past its limit of 4,096"):
            training.save_state("too-big").result()
        with pytest.raises(Exception, match="past its limit of 4,096"):
            training.save_weights_for_sampler("too-big").result()
        assert client.create_rest_client().list_checkpoints(training.model_id).result().checkpoints == []
        assert app.state.storage.list_keys("tinker/") == []
        training.forward_backward([datum(weights=[1.0] * 9)], "cross_entropy").result()


def test_a_supervised_loop_through_the_client_equals_the_same_tuneforge_job(
    server: tuple[str, FastAPI], service: Any, tenant: Tenant, settings: Settings, tmp_path: Any
) -> None:
    """The same data and hyperparameters through the client and as a LoRA job give the same run: the job's
    batches (the recipe's encoding and seeded shuffle), its loss (the mean over a step's completion tokens: weights
    of 1/N), its learning-rate schedule, AdamW's defaults and gradient clipping, LoRA on every linear layer but
    the output layer (`all-linear`), rank = alpha, no dropout, the same seed. Tolerance: every step's loss within
    1e-4 relative, and the two adapters' weights within 1e-4 absolute (float32 sums in another order)."""
    from safetensors.torch import load_file

    from app.ml.formatting import IGNORE_INDEX
    from app.ml.training.data import batches, encode_examples
    from app.ml.training.schedule import learning_rate_factor
    from app.models.service import load_tokenizer

    records = [
        {"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" It is {2 * i}, as always."}
        for i in range(6)
    ]
    hp = {
        "n_epochs": 2,
        "batch_size": 2,
        "learning_rate": 0.01,
        "lr_scheduler": "linear",
        "warmup_ratio": 0.25,
        "seed": 11,
        "lora_r": 4,
        "lora_alpha": 4,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
    }
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {tenant.key}"}) as http:
        file_id = upload(http, tenant, jsonl([json.dumps(r) for r in records])).json()["id"]  # type: ignore[arg-type]
        job = http.post(
            "/jobs", json={"base_model": "tiny-random-llama", "training_file": file_id, "hyperparameters": hp}
        )
        assert job.status_code == 201, job.text
        adapter_id = run_training_job(settings, job.json()["id"])
        assert adapter_id is not None
        job_losses = [
            value for _, value in http.get(f"/jobs/{job.json()['id']}/metrics").json()["curves"]["train_loss"]
        ]
        with tarfile.open(fileobj=io.BytesIO(http.get(f"/adapters/{adapter_id}/download").content)) as tar:
            tar.extractall(tmp_path / "job", filter="data")

    # The client's loop: the recipe's examples in the recipe's batches, each step's loss the mean token loss.
    tokenizer = load_tokenizer(ModelStore(settings.models_dir, None), BUILTINS["tiny-random-llama"])
    examples = encode_examples(records, tokenizer, 512).examples
    steps_per_epoch = len(examples) // hp["batch_size"]
    schedule = learning_rate_factor(steps_per_epoch * hp["n_epochs"], hp["warmup_ratio"], hp["lr_scheduler"])
    training = service.create_lora_training_client(
        base_model="tiny-random-llama", rank=4, seed=hp["seed"], train_unembed=False
    ).result()
    losses, step = [], 0
    for epoch in range(1, hp["n_epochs"] + 1):
        for batch in batches(examples, hp["batch_size"], shuffle_seed=hp["seed"] + epoch):
            n_tokens = sum(e.n_loss_tokens for e in batch)
            data = [
                types.Datum(
                    model_input=types.ModelInput.from_ints(e.input_ids[:-1]),
                    loss_fn_inputs={
                        "target_tokens": e.input_ids[1:],
                        "weights": [float(label != IGNORE_INDEX) / n_tokens for label in e.labels[1:]],
                    },
                )
                for e in batch
            ]
            result = training.forward_backward(data, "cross_entropy").result()
            adam = types.AdamParams(
                learning_rate=hp["learning_rate"] * schedule(step), beta2=0.999, eps=1e-8, grad_clip_norm=1.0
            )
            training.optim_step(adam).result()
            losses.append(result.metrics["loss:sum"])
            step += 1
    assert len(losses) == len(job_losses) == 6
    assert losses == pytest.approx(job_losses, rel=1e-4)
    saved = training.save_weights_for_sampler("same-as-the-job").result()
    run_id, _, name = saved.path.removeprefix("tinker://").partition("/")
    archive = httpx.get(
        f"{server[0]}/api/v1/training_runs/{run_id}/checkpoints/{name}/archive",
        headers={"X-API-Key": f"tml-{tenant.key}"},
    )
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(tmp_path / "tinker", filter="data")
    ours = load_file(str(tmp_path / "tinker" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "job" / "adapter_model.safetensors"))
    assert set(ours) == set(theirs) and len(ours) > 0
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=1e-4)


def test_a_run_the_memory_cannot_hold_is_refused_clearly_and_holds_nothing(
    service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    real = psutil.virtual_memory()
    tight = real._replace(available=64 * 1024)  # 64 KiB to spare: no LoRA fits
    monkeypatch.setattr(psutil, "virtual_memory", lambda: tight)
    with pytest.raises(Exception, match=r"needs [\d,]+ MiB for its weights, gradients and AdamW's state"):
        service.create_lora_training_client(base_model="tiny-random-llama", rank=8, seed=0).result()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real)
    # The refused runs count against no limit (this server allows 3 a tenant).
    for seed in range(3):
        service.create_lora_training_client(base_model="tiny-random-llama", rank=8, seed=seed).result()


def test_saved_weights_with_a_time_to_live_are_deleted_when_it_ends(
    server: tuple[str, FastAPI], service: Any, tenant: Tenant
) -> None:
    """`ttl_seconds` on a save (the cookbook's periodic saves send one) or set afterwards: listed as `expires_at`,
    and once it has passed the API's loop deletes the weights — rows, files, and the adapter of sampler weights.
    Publishing (sharing with other users) and signed URLs are refused with what to do instead."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from app.core.db import session_scope
    from app.core.models import TinkerCheckpoint

    state = server[1].state
    training = service.create_lora_training_client(base_model="tiny-random-llama", rank=4, seed=0).result()
    kept = training.save_state("kept").result()
    rest = service.create_rest_client()
    # Through the client's save (its ttl_seconds), and set afterwards on the other.
    future = training.save_weights_for_sampler("short-lived", ttl_seconds=7200)
    sampler = future.result()
    rest.set_checkpoint_ttl_from_tinker_path(kept.path, 86400).result()
    listed = {c.tinker_path: c for c in rest.list_checkpoints(training.model_id).result().checkpoints}
    now = datetime.now(UTC)
    assert listed[sampler.path].expires_at is not None
    assert abs((listed[sampler.path].expires_at - now) - timedelta(seconds=7200)) < timedelta(seconds=60)
    assert abs((listed[kept.path].expires_at - now) - timedelta(seconds=86400)) < timedelta(seconds=60)
    rest.set_checkpoint_ttl_from_tinker_path(kept.path, None).result()
    adapters = httpx.get(f"{server[0]}/adapters", headers={"Authorization": f"Bearer {tenant.key}"}).json()["data"]
    (adapter_id,) = [a["id"] for a in adapters if a["tinker_path"] == sampler.path]

    # Two hours later (the row's clock moved back): the loop's round deletes the short-lived weights only.
    with session_scope(state.settings.db_url) as db:
        db.execute(
            update(TinkerCheckpoint)
            .where(TinkerCheckpoint.tinker_path == sampler.path)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert state.tinker.expire_checkpoints() == 1
    assert [c.tinker_path for c in rest.list_checkpoints(training.model_id).result().checkpoints] == [kept.path]
    gone = httpx.get(f"{server[0]}/adapters/{adapter_id}", headers={"Authorization": f"Bearer {tenant.key}"})
    assert gone.status_code == 404
    assert [k for k in state.storage.list_keys("tinker/") if "short-lived" in k] == []
    assert state.tinker.expire_checkpoints() == 0

    with pytest.raises(Exception, match="publishing checkpoints is not served here"):
        rest.publish_checkpoint_from_tinker_path(kept.path).result()


def test_a_run_held_by_another_api_process_is_said_to_be_there(
    server: tuple[str, FastAPI], tenant: Tenant, settings: Settings
) -> None:
    """Runs live in the memory of the API process that made them: a request for one that reaches another process
    (several replicas without routing by session, or after a restart) says where the run is and what to do."""
    from app.core.db import session_scope
    from app.core.models import TinkerRun
    from app.tinker.service import HOLDER

    with session_scope(settings.db_url) as db:
        db.add(
            TinkerRun(
                id="tfs-elsewhere:train:0",
                tenant_id=tenant_id(settings, tenant),
                base_model="tiny-random-llama",
                lora_rank=4,
                lora_config={"rank": 4},
                holder="other-host:4242",
            )
        )
    step = {"model_id": "tfs-elsewhere:train:0", "seq_id": 1, "adam_params": {"learning_rate": 0.1}}
    answer = httpx.post(f"{server[0]}/api/v1/optim_step", json=step, headers={"X-API-Key": f"tml-{tenant.key}"})
    assert answer.status_code == 404
    message = answer.json()["error"]["message"]
    assert "held in the memory of another API process (other-host:4242)" in message and HOLDER in message
    assert "create_training_client_from_state_with_optimizer" in message


def test_the_top_k_tokens_at_each_prompt_position(service: Any, settings: Settings) -> None:
    """`topk_prompt_logprobs=k`: at each prompt position after the first, the k likeliest tokens and their
    log-probabilities, as the model computes them here (the first position: none)."""
    sampler = service.create_sampling_client(base_model="tiny-random-llama")
    prompt = types.ModelInput.from_ints(TOKENS)
    answer = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True, topk_prompt_logprobs=3
    ).result()
    model = ModelStore(settings.models_dir, None).load(BUILTINS["tiny-random-llama"])
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=torch.tensor([TOKENS])).logits.float()[0, :-1], -1).topk(3)
    table = answer.topk_prompt_logprobs
    assert table is not None and len(table) == len(TOKENS) and table[0] is None
    for position, row in enumerate(table[1:]):
        assert row is not None and [token for token, _ in row] == expected.indices[position].tolist()
        assert [lp for _, lp in row] == pytest.approx(expected.values[position].tolist(), abs=1e-4)
    assert answer.prompt_logprobs is not None and answer.prompt_logprobs[0] is None
    with pytest.raises(Exception, match="topk_prompt_logprobs"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1), topk_prompt_logprobs=21).result()


def test_refusals_name_what_is_wrong_and_another_tenants_run_is_not_found(
    server: tuple[str, FastAPI], service: Any, tenant: Tenant, make_tenant: Any
) -> None:
    training = service.create_lora_training_client(base_model="tiny-random-llama", rank=2, seed=0).result()
    wrong_length = datum(weights=[1.0] * 5)  # 9 positions
    with pytest.raises(Exception, match=r"data\[0\]\.loss_fn_inputs\.weights: 5 values for 9 input tokens"):
        training.forward_backward([wrong_length], "cross_entropy").result()
    outside = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": [10**6] * 9, "weights": [1.0] * 9},
    )
    with pytest.raises(Exception, match="target_tokens: a token id outside the model's vocabulary"):
        training.forward([outside], "cross_entropy").result()
    with pytest.raises(Exception, match="importance_sampling needs 'advantages'"):
        training.forward([datum(logprobs=[0.0] * 9)], "importance_sampling").result()
    with pytest.raises(Exception, match="unknown base_model .no-such-model.; available: "):
        service.create_lora_training_client(base_model="no-such-model", rank=2).result()
    with pytest.raises(Exception, match="adam_params.learning_rate"):  # refused by the body's validation
        training.optim_step(types.AdamParams(learning_rate=-1.0)).result()
    # The run is fine after its refused requests (each still took its turn: the later ones do not wait for it).
    assert training.forward([datum(weights=[1.0] * 9)], "cross_entropy").result().metrics["loss:sum"] > 0

    # Three runs a tenant on this server (TUNEFORGE_TINKER_MAX_RUNS_PER_TENANT): the fourth is refused, saying so.
    for seed in (1, 2):
        service.create_lora_training_client(base_model="tiny-random-llama", rank=2, seed=seed).result()
    with pytest.raises(Exception, match="TUNEFORGE_TINKER_MAX_RUNS"):
        service.create_lora_training_client(base_model="tiny-random-llama", rank=2, seed=3).result()

    # Another tenant sees none of it, by either API.
    other = make_tenant()
    saved = training.save_weights_for_sampler("mine").result()
    with tinker.ServiceClient(base_url=server[0], api_key=f"tml-{other.key}") as theirs:
        with pytest.raises(tinker.NotFoundError):
            theirs.create_rest_client().get_training_run(training.model_id).result()
        with pytest.raises(tinker.NotFoundError, match="no saved weights at"):
            theirs.create_sampling_client(model_path=saved.path).sample(
                types.ModelInput.from_ints(TOKENS[:3]), 1, types.SamplingParams(max_tokens=2)
            ).result()
    step = {"model_id": training.model_id, "seq_id": 99, "adam_params": {"learning_rate": 0.1}}
    as_other = {"X-API-Key": f"tml-{other.key}"}
    assert httpx.post(f"{server[0]}/api/v1/optim_step", json=step, headers=as_other).status_code == 404
    bearer = {"Authorization": f"Bearer {other.key}"}
    assert httpx.get(f"{server[0]}/training_runs/{training.model_id}", headers=bearer).status_code == 404
    assert httpx.get(f"{server[0]}/training_runs", headers=bearer).json()["data"] == []
    assert httpx.get(f"{server[0]}/adapters", headers=bearer).json()["data"] == []
    generate = {"adapter_id": saved.path, "prompt": "x", "max_tokens": 2}
    assert httpx.post(f"{server[0]}/generate", json=generate, headers=bearer).status_code == 404
