"""The dashboard at /ui, in headless Chromium against a live server: the key form, the jobs list, a trained job's
loss curves (as many points as its metric events), its events, checkpoints and adapter download, the playground
side by side with the base model, and a running job's curve drawn from the event stream. Every request the page
makes goes to the server itself: it works on an air-gapped host.

`TUNEFORGE_UI_SCREENSHOT=docs/dashboard-job.png pytest tests/test_ui.py` also saves the job page for the README.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.models import TERMINAL_STATUSES
from app.core.settings import Settings
from app.main import create_app
from app.ui.endpoints import ASSETS
from tests.conftest import Tenant, jsonl, upload
from tests.test_inference_api import live
from worker.runner import run_training_job

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; .ci/run installs it
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROMPT = "The secret word is"
WAIT_MS = 30_000
CHECKPOINT_IDS = "[...document.querySelectorAll('#checkpoints tbody tr')].map(row => row.dataset.checkpointId)"


def create_job(client: TestClient, tenant: Tenant) -> str:
    """A small LoRA job with a held-out split: 24 steps and 8 evaluations, so both curves have several points."""
    file_id = upload(client, tenant, jsonl([json.dumps({"prompt": PROMPT, "completion": " plum"})] * 8)).json()["id"]
    hyperparameters = {
        "n_epochs": 8,
        "batch_size": 2,
        "learning_rate": 0.05,
        "validation_split": 0.25,
        "target_modules": "all-linear",
    }
    r = client.post(
        "/jobs",
        headers=tenant.headers,
        json={"base_model": "tiny-random-llama", "training_file": file_id, "hyperparameters": hyperparameters},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def api(client: TestClient, tenant: Tenant, path: str) -> Any:
    r = client.get(path, headers=tenant.headers)
    assert r.status_code == 200, r.text
    return r.json()


def api_error(client: TestClient, tenant: Tenant, path: str) -> str:
    r = client.get(path, headers=tenant.headers)
    assert r.status_code >= 400, r.text
    return str(r.json()["error"]["message"])


# --- without a browser --------------------------------------------------------------------------------------------


def test_the_page_and_every_asset_are_served_without_a_key(client: TestClient) -> None:
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/ui/").text == page.text
    linked = set(re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page.text))
    assert linked == {"/ui/static/style.css", "/ui/static/app.js"}
    imported = set(re.findall(r'from "\./([\w.]+)"', client.get("/ui/static/app.js").text))
    assert imported == {"api.js", "chart.js"}
    for name in ASSETS:  # every file the package ships, and only those
        r = client.get(f"/ui/static/{name}")
        assert r.status_code == 200, name
        if name.endswith(".js"):
            assert r.headers["content-type"].startswith("text/javascript"), name  # else no ES module loads
    assert set(ASSETS) >= {name.removeprefix("/ui/static/") for name in linked} | imported
    # The states that end a job come from the server's state machine, not a copy in the page.
    assert re.findall(r'from "\./([\w.]+)"', client.get("/ui/static/api.js").text) == ["job_states.js"]
    states = client.get("/ui/static/job_states.js")
    assert states.status_code == 200 and states.headers["content-type"].startswith("text/javascript")
    assert states.text == f"export const TERMINAL_STATUSES = {json.dumps(sorted(TERMINAL_STATUSES))};\n"
    assert sorted(TERMINAL_STATUSES) == ["cancelled", "failed", "succeeded"]
    missing = client.get("/ui/static/missing.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert client.get("/ui/static/../endpoints.py").status_code == 404
    assert client.get("/ui/static/%2e%2e/endpoints.py").status_code == 404
    # The dashboard is public; the API behind it is not, and neither is anything else.
    assert client.get("/jobs").status_code == 401
    assert client.get("/uix").status_code == 401


def test_the_dashboard_runs_only_its_own_files_and_no_site_may_frame_it(client: TestClient) -> None:
    for path in ("/ui", "/ui/", "/ui/static/app.js", "/ui/static/job_states.js"):
        r = client.get(path)
        policy = dict(directive.strip().split(" ", 1) for directive in r.headers["content-security-policy"].split(";"))
        assert policy["frame-ancestors"] == "'none'" and r.headers["x-frame-options"] == "DENY", path
        assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'", path
        assert policy["default-src"] == "'self'" and policy["object-src"] == "'none'", path
    # What the policy allows is all the page needs: no inline script or style, every asset from the server itself.
    page = client.get("/ui").text
    assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son\w+=", page)


def test_the_dashboard_stays_out_of_the_api_schema(client: TestClient) -> None:
    assert not [path for path in client.get("/openapi.json").json()["paths"] if path.startswith("/ui")]


# --- in Chromium --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("the browser tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (dev extras)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def server(settings: Settings) -> Iterator[str]:
    with live(create_app(settings)) as url:
        yield url


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    requested: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Whatever the Content-Security-Policy refuses (an inline style, a script, a request elsewhere) is a bug.
    page.on(
        "console", lambda message: errors.extend([message.text] if "Content Security Policy" in message.text else [])
    )
    page.requested = requested
    yield page
    context.close()
    # Air-gapped: nothing but the server itself (and the page's own blob: download URLs).
    assert [url for url in requested if not url.startswith((server + "/", "blob:", "data:"))] == []
    assert errors == []


@pytest.mark.browser
def test_another_site_cannot_frame_the_dashboard(browser: Any, server: str) -> None:
    """Clickjacking: a page elsewhere that frames /ui gets an empty frame, never the dashboard (and its key form)."""
    context = browser.new_context()
    page = context.new_page()
    refusals: list[str] = []

    def on_console(message: Any) -> None:
        if "frame-ancestors" in message.text:
            refusals.append(message.text)

    page.on("console", on_console)
    try:
        with page.expect_response(f"{server}/ui") as framed:
            page.set_content(f'<iframe src="{server}/ui"></iframe>')
        assert framed.value.status == 200  # served; the browser refuses to show it
        for _ in range(50):
            if refusals:
                break
            page.wait_for_timeout(100)
        assert refusals, "the browser showed the dashboard inside another page"
        [child] = [frame for frame in page.frames if frame != page.main_frame]
        assert child.query_selector("#view") is None and child.query_selector("#api-key") is None
    finally:
        context.close()


def points(page: Any, series: str) -> int:
    count = page.evaluate(
        "s => document.querySelector(`#loss-chart polyline[data-series=${s}]`)?.points.numberOfItems ?? 0", series
    )
    return int(count)


def wait_for_points(page: Any, series: str, expected: int) -> None:
    page.wait_for_function(
        "([s, n]) => document.querySelector(`#loss-chart polyline[data-series=${s}]`)?.points.numberOfItems === n",
        arg=[series, expected],
    )


@pytest.mark.browser
def test_a_trained_job_in_the_dashboard(
    client: TestClient, tenant: Tenant, settings: Settings, server: str, page: Any, tmp_path: Path
) -> None:
    job_id = create_job(client, tenant)
    adapter_id = run_training_job(settings, job_id)
    assert adapter_id is not None

    # The key form: a wrong key shows the API's own message; the right one is kept and opens the jobs list.
    page.goto(f"{server}/ui")
    wrong = client.get("/jobs", headers={"Authorization": "Bearer tf-wrong"}).json()["error"]["message"]
    page.fill("#api-key", "tf-wrong")
    page.click("#key-form button")
    page.wait_for_function("m => document.querySelector('#key-error')?.textContent === m", arg=wrong)
    page.fill("#api-key", tenant.key)
    page.click("#key-form button")
    row = page.locator(f'#jobs tr[data-job-id="{job_id}"]')
    assert row.locator("[data-field=status]").inner_text() == "succeeded"
    assert page.evaluate("localStorage.getItem('tuneforge.apiKey')") == tenant.key

    # An API error shows the API's message.
    page.goto(f"{server}/ui#/jobs/ftjob-missing")
    missing = api_error(client, tenant, "/jobs/ftjob-missing")
    page.wait_for_function("m => document.querySelector('main [role=alert]')?.textContent === m", arg=missing)
    page.goto(f"{server}/ui#/jobs")

    # The job page: both curves with one plotted point per metric event, every event, every checkpoint.
    row.locator(f'a[href="#/jobs/{job_id}"]').click()
    curves = api(client, tenant, f"/jobs/{job_id}/metrics")["curves"]
    assert len(curves["train_loss"]) == 24 and len(curves["valid_loss"]) == 8
    wait_for_points(page, "train_loss", len(curves["train_loss"]))
    wait_for_points(page, "valid_loss", len(curves["valid_loss"]))
    events = api(client, tenant, f"/jobs/{job_id}/events?limit=1000")["data"]
    metric_events = [e for e in events if e["type"] in ("metrics", "eval")]
    assert points(page, "train_loss") + points(page, "valid_loss") == len(metric_events)
    assert page.locator("#events tbody tr").count() == len(events)
    assert page.locator("#events tbody tr").last.inner_text().endswith(events[-1]["message"])
    checkpoints = [c["id"] for c in api(client, tenant, f"/jobs/{job_id}/checkpoints")["data"]]
    assert len(checkpoints) >= 2
    page.wait_for_function(f"ids => JSON.stringify({CHECKPOINT_IDS}) === JSON.stringify(ids)", arg=checkpoints)
    assert page.locator("h1 [data-field=status]").inner_text() == "succeeded"
    if target := os.environ.get("TUNEFORGE_UI_SCREENSHOT"):
        page.screenshot(path=target, full_page=True)

    # The adapter's download link saves the archive the API serves.
    link = page.locator(f'[data-fact=adapter] a[data-download="{adapter_id}"]')
    with page.expect_download() as download_info:
        link.click()
    saved = tmp_path / "adapter.tar.gz"
    download_info.value.save_as(saved)
    assert download_info.value.suggested_filename == f"{adapter_id}.tar.gz"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == api(client, tenant, f"/adapters/{adapter_id}")["sha256"]
    with tarfile.open(fileobj=io.BytesIO(saved.read_bytes())) as archive:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {Path(n).name for n in archive.getnames()}

    # The adapters list links the same download.
    page.click("nav a[data-nav=adapters]")
    page.locator(f'#adapters tr[data-adapter-id="{adapter_id}"] a[data-download="{adapter_id}"]').wait_for()

    # The playground: the same prompt through the adapter and through the base model, side by side.
    page.goto(f"{server}/ui#/jobs/{job_id}")
    page.locator("[data-fact=adapter]").get_by_text("Try").click()
    assert page.locator("#pg-adapter").input_value() == adapter_id
    page.fill("#pg-prompt", PROMPT)
    page.fill("#pg-max-tokens", "3")
    page.click("#pg-run")
    page.wait_for_selector("#output-adapter[data-state=done]")
    page.wait_for_selector("#output-base[data-state=done]")
    adapter_text = page.locator("[data-output=adapter]").text_content()
    base_text = page.locator("[data-output=base]").text_content()
    request = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    expected = client.post("/generate", headers=tenant.headers, json={**request, "adapter_id": adapter_id}).json()
    base = client.post("/generate", headers=tenant.headers, json={**request, "base_model": "tiny-random-llama"}).json()
    assert adapter_text == expected["text"] and adapter_text.startswith(" plum")  # what it was trained to say
    assert base_text == base["text"] and base_text != adapter_text
    assert "3 tokens" in page.locator("[data-meta=adapter]").inner_text()


@pytest.mark.browser
def test_the_curve_follows_a_running_job_from_the_event_stream(
    client: TestClient, tenant: Tenant, settings: Settings, server: str, page: Any
) -> None:
    job_id = create_job(client, tenant)  # queued: no worker takes it until the test runs it
    page.add_init_script(f"localStorage.setItem('tuneforge.apiKey', {json.dumps(tenant.key)})")
    page.goto(f"{server}/ui#/jobs/{job_id}")
    page.wait_for_selector("#live.on")  # the event stream is open
    assert page.locator("h1 [data-field=status]").inner_text() == "queued"
    assert points(page, "train_loss") == 0 and page.locator("#loss-chart .empty").count() == 1
    # Every plotted count from here on, recorded in the page as the chart redraws.
    page.evaluate(
        """() => {
        window.seen = [];
        new MutationObserver(() => {
          const line = document.querySelector('#loss-chart polyline[data-series=train_loss]');
          window.seen.push(line ? line.points.numberOfItems : 0);
        }).observe(document.querySelector('#loss-chart'), {childList: true, subtree: true});
        window.samePage = true;
      }"""
    )

    result: list[str | None] = []
    worker = threading.Thread(target=lambda: result.append(run_training_job(settings, job_id)))
    worker.start()
    worker.join(timeout=120)
    assert result and result[0] is not None
    curves = api(client, tenant, f"/jobs/{job_id}/metrics")["curves"]
    wait_for_points(page, "train_loss", len(curves["train_loss"]))
    wait_for_points(page, "valid_loss", len(curves["valid_loss"]))
    page.wait_for_selector("h1 [data-field=status]:text('succeeded')")
    page.wait_for_selector("#live:not(.on)", state="attached")  # the stream ended with the job

    # Drawn from the stream, not a reload: the same page, and the curves were fetched once, before training.
    assert page.evaluate("window.samePage") is True
    assert [url for url in page.requested if "/metrics" in url] == [f"{server}/jobs/{job_id}/metrics"]
    seen = page.evaluate("window.seen")
    assert seen == sorted(seen) and seen[-1] == len(curves["train_loss"])
    events = api(client, tenant, f"/jobs/{job_id}/events?limit=1000")["data"]
    page.wait_for_function("n => document.querySelectorAll('#events tbody tr').length === n", arg=len(events))
    checkpoints = [c["id"] for c in api(client, tenant, f"/jobs/{job_id}/checkpoints")["data"]]
    page.wait_for_function(f"ids => JSON.stringify({CHECKPOINT_IDS}) === JSON.stringify(ids)", arg=checkpoints)
    assert page.locator(f'[data-fact=adapter] a[data-download="{result[0]}"]').count() == 1


@pytest.mark.browser
def test_a_tinker_run_in_the_dashboard(tenant: Tenant, server: str, page: Any) -> None:
    """A training run the official tinker client steps: listed with its steps, its loss curve one point per
    optimizer step, and its sampler weights as an adapter with the download and playground links."""
    import tinker

    with tinker.ServiceClient(base_url=server, api_key=f"tml-{tenant.key}") as service:
        saved = train_a_few_steps(service)
        run_id = saved.path.removeprefix("tinker://").split("/")[0]

    page.add_init_script(f"localStorage.setItem('tuneforge.apiKey', {json.dumps(tenant.key)})")
    page.goto(f"{server}/ui#/runs")
    row = page.locator(f'#runs tr[data-run-id="{run_id}"]')
    assert row.locator("[data-field=steps]").inner_text() == "4"
    row.locator("a").click()
    wait_for_points(page, "loss", 4)
    saved_row = page.locator(f'#saved-weights tr[data-path="{saved.path}"]')
    adapter_id = saved_row.locator("a[data-download]").get_attribute("data-download")
    assert adapter_id is not None and adapter_id.startswith("adapter-")
    saved_row.get_by_text("Try").click()
    assert page.locator("#pg-adapter").input_value() == adapter_id
    page.click("nav a[data-nav=adapters]")
    page.locator(f'#adapters tr[data-adapter-id="{adapter_id}"]').get_by_text(saved.path).wait_for()


def train_a_few_steps(service: Any) -> Any:
    """Four steps of a LoRA through the tinker client, then its weights saved for sampling (named `shown`)."""
    from tinker import types

    training = service.create_lora_training_client(base_model="tiny-random-llama", rank=4, seed=0).result()
    tokens = [1, 7, 12, 40, 3, 99, 150, 61, 8, 22]
    example = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 9},
    )
    for _ in range(4):
        training.forward_backward([example], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=0.02))
    return training.save_weights_for_sampler("shown").result()


@pytest.mark.browser
def test_a_sweep_in_the_dashboard(
    client: TestClient, tenant: Tenant, settings: Settings, server: str, page: Any
) -> None:
    """The sweep page: its table in rank order, every configuration's validation curve on one chart, and the top two
    adapters side by side in the playground."""
    import httpx

    from tests.test_sweeps import run_queued_jobs

    train = upload(client, tenant, jsonl([json.dumps({"prompt": PROMPT, "completion": " plum"})] * 8)).json()["id"]
    fast = {"n_epochs": 4, "batch_size": 2, "validation_split": 0.25}
    r = client.post(
        "/sweeps",
        headers=tenant.headers,
        json={
            "name": "ui",
            "base_model": "tiny-random-llama",
            "training_file": train,
            "configurations": [
                {"method": "lora", "hyperparameters": {**fast, "learning_rate": 0.05, "target_modules": "all-linear"}},
                {"method": "ia3", "hyperparameters": {**fast, "learning_rate": 0.001}},
            ],
            "early_elimination": {"rule": "none"},
        },
    )
    assert r.status_code == 201, r.text
    with httpx.Client(base_url=server, headers=tenant.headers, timeout=60) as http:
        sweep = run_queued_jobs(http, settings, r.json()["id"])
    assert sweep["status"] == "succeeded"

    page.goto(f"{server}/ui")
    page.fill("#api-key", tenant.key)
    page.click("#key-form button")
    page.click("nav a[data-nav=sweeps]")
    page.locator(f'#sweeps tr[data-sweep-id="{sweep["id"]}"] a').click()
    page.wait_for_function("n => document.querySelectorAll('#sweep-results tbody tr').length === n", arg=2)
    methods = page.locator("#sweep-results tbody [data-field=method]").all_inner_texts()
    assert methods == [result["method"] for result in sweep["results"]]
    for result in sweep["results"]:
        curve = api(client, tenant, f"/jobs/{result['job_id']}/metrics")["curves"]["valid_loss"]
        assert len(curve) >= 2
        page.wait_for_function(
            "([s, n]) => document.querySelector(`#sweep-chart polyline[data-series=${s}]`)?.points.numberOfItems === n",
            arg=[result["job_id"], len(curve)],
        )

    first, second = (result["adapter_id"] for result in sweep["results"])
    page.click("#compare-top-two")
    assert page.locator("#pg-adapter").input_value() == first
    assert page.locator("#pg-compare").input_value() == second
    page.fill("#pg-prompt", PROMPT)
    page.fill("#pg-max-tokens", "3")
    page.click("#pg-run")
    page.wait_for_selector("#output-adapter[data-state=done]")
    page.wait_for_selector("#output-base[data-state=done]")
    request = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    for panel, adapter in (("adapter", first), ("base", second)):
        expected = client.post("/generate", headers=tenant.headers, json={**request, "adapter_id": adapter}).json()
        assert page.locator(f"[data-output={panel}]").text_content() == expected["text"]
