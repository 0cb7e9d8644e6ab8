"""Webhooks: endpoints registered over the API (the official `openai` client's `webhooks.*`, plain HTTP and the
CLI), a job's end sent to a real HTTP receiver on loopback and verified with the official client's
`client.webhooks.unwrap`; at least once across a receiver that is down, a restart and concurrent senders; private
addresses, slow receivers, bounds and tenants."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import httpx
import pytest
from openai import InvalidWebhookSignatureError, OpenAI
from openai.types.webhooks import (
    FineTuningJobCancelledWebhookEvent,
    FineTuningJobFailedWebhookEvent,
    FineTuningJobSucceededWebhookEvent,
    WebhookEndpointWithSecret,
)

from app.core.settings import Settings
from app.main import create_app
from app.webhooks.delivery import deliver_due
from tests.conftest import Tenant, chat_lines, free_port, live
from tests.test_cli import Cli
from tests.test_openai_schemas import check
from tests.test_worker import start_job
from worker.runner import run_training_job

EVENTS = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]
# Receivers on loopback, retries within a second, a sender that looks often.
FAST = {
    "webhook_allow_private_urls": True,
    "webhook_poll_seconds": 0.1,
    "webhook_retry_initial_seconds": 0.2,
    "webhook_timeout_seconds": 2.0,
}
# No example fits max_seq_length=16 with its completion: the job fails with invalid_training_data.
UNTRAINABLE = [json.dumps({"prompt": "word " * 40, "completion": " end"})] * 2
T = TypeVar("T")


# --- a receiver ---------------------------------------------------------------------------------------------
@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A tiny threaded HTTP server on loopback that records each POST and answers the next of `statuses` (then
    200), after `delay` seconds; with `endless_body` it answers 200 with a body that never ends."""

    port: int = field(default_factory=free_port)
    statuses: list[int] = field(default_factory=list)
    delay: float = 0.0
    endless_body: bool = False
    requests: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.requests.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
                time.sleep(receiver.delay)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                try:
                    if receiver.endless_body:
                        self.send_header("content-length", str(10**12))
                        self.end_headers()
                        while True:
                            self.wfile.write(b"x" * 65536)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the sender hung up
                    pass

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, n: int, timeout: float = 30) -> list[Received]:
        wait_until(lambda: len(self.requests) >= n or None, timeout=timeout, what=f"{n} requests")
        return list(self.requests)


def wait_until(check: Callable[[], T | None], *, timeout: float = 30, what: str = "the condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- the service --------------------------------------------------------------------------------------------
@dataclass
class Service:
    url: str
    http: httpx.Client
    settings: Settings

    def openai(self, tenant: Tenant) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=tenant.key, max_retries=0)

    def add(self, tenant: Tenant, **body: Any) -> dict[str, Any]:
        r = self.http.post("/v1/webhook_endpoints", headers=tenant.headers, json=body)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def deliveries(self, tenant: Tenant, endpoint_id: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries", headers=tenant.headers)
        assert r.status_code == 200, r.text
        return r.json()["data"]  # type: ignore[no-any-return]

    def cancelled_job(self, tenant: Tenant) -> str:
        job_id = start_job(self.http, tenant)  # type: ignore[arg-type]
        assert self.http.post(f"/jobs/{job_id}/cancel", headers=tenant.headers).json()["status"] == "cancelled"
        return job_id


@contextmanager
def service(settings: Settings, **overrides: Any) -> Iterator[Service]:
    """The API on a loopback port, with its webhook sender running (unless webhook_poll_seconds=0)."""
    configured = settings.model_copy(update={**FAST, **overrides})
    with live(create_app(configured)) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield Service(url, http, configured)


# --- endpoints ----------------------------------------------------------------------------------------------
def test_endpoints_through_the_official_client_and_the_secret_shown_once(settings: Settings, tenant: Tenant) -> None:
    with service(settings) as svc:
        client = svc.openai(tenant)
        created = client.webhooks.create(
            url="http://127.0.0.1:9/hook", name="ci", event_types=["fine_tuning.job.succeeded"]
        )
        assert isinstance(created, WebhookEndpointWithSecret)
        assert (created.object, created.name, created.event_types) == ("webhook_endpoint", "ci", EVENTS[:1])
        secret = created.signing_secret
        assert secret.startswith("whsec_") and len(base64.b64decode(secret[len("whsec_") :])) == 32
        assert created.signing_secret_hint == f"whsec_…{secret[-4:]}"

        listed = list(client.webhooks.list())
        assert [(e.id, e.url, e.event_types) for e in listed] == [(created.id, "http://127.0.0.1:9/hook", EVENTS[:1])]
        assert client.webhooks.retrieve(created.id).signing_secret_hint == created.signing_secret_hint
        for path in ("/v1/webhook_endpoints", f"/v1/webhook_endpoints/{created.id}"):
            text = svc.http.get(path, headers=tenant.headers).text
            assert secret not in text and '"secret"' not in text and '"signing_secret"' not in text
        assert client.webhooks.event_types.list().data == EVENTS

        # The shape: `url` alone subscribes to every event; `secret` and `events` beside OpenAI's names.
        plain = svc.add(tenant, url="http://127.0.0.1:9/other")
        assert plain["object"] == "webhook_endpoint" and plain["events"] == plain["event_types"] == EVENTS
        assert plain["secret"] == plain["signing_secret"] != secret and plain["created_at"] > 0
        assert [e.id for e in client.webhooks.list()] == [plain["id"], created.id]  # newest first

        deleted = client.webhooks.delete(created.id)
        assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "webhook_endpoint.deleted")
        assert [e.id for e in client.webhooks.list()] == [plain["id"]]
        r = svc.http.delete(f"/v1/webhook_endpoints/{created.id}", headers=tenant.headers)
        assert r.status_code == 404 and r.json()["error"]["param"] == "webhook_endpoint_id"


def test_endpoints_change_rotate_their_secret_and_take_a_test_event_through_the_official_client(
    settings: Settings, tenant: Tenant
) -> None:
    with Receiver() as first, Receiver() as second, service(settings) as svc:
        client = svc.openai(tenant)
        created = client.webhooks.create(url=first.url, name="ci", event_types=["fine_tuning.job.succeeded"])
        same = client.webhooks.update(created.id, name="ci")
        assert same.updated_at == created.updated_at  # nothing changed: not moved
        time.sleep(1.1)
        changed = client.webhooks.update(created.id, url=second.url, event_types=EVENTS[:2], name="moved")
        assert (changed.url, changed.event_types, changed.name) == (second.url, EVENTS[:2], "moved")
        assert changed.updated_at is not None and created.updated_at is not None
        assert changed.updated_at > created.updated_at
        refused = svc.http.post(
            f"/v1/webhook_endpoints/{created.id}", headers=tenant.headers, json={"events": ["job.exploded"]}
        )
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "events"

        # A test event: sent now, to the new URL, signed; the receiver's status comes back.
        second.statuses = [204]
        result = client.webhooks.test(created.id, event_type="fine_tuning.job.failed")
        assert (result.object, result.webhook_endpoint_id, result.status_code, result.success) == (
            "webhook_endpoint.test",
            created.id,
            204,
            True,
        )
        [sample] = second.requests
        assert first.requests == []
        event = client.webhooks.unwrap(sample.body, sample.headers, secret=created.signing_secret)
        assert isinstance(event, FineTuningJobFailedWebhookEvent) and event.data.id.startswith("ftjob-test")
        assert svc.deliveries(tenant, created.id) == []  # a test is not a delivery

        # Rotation keeping the old secret: each delivery is signed with both for a day, so either verifies.
        kept = client.webhooks.rotate_secret(created.id, keep_old_secret_active_for_24_hours=True)
        assert kept.signing_secret != created.signing_secret and kept.signing_secret_hint == (
            f"whsec_…{kept.signing_secret[-4:]}"
        )
        client.webhooks.test(created.id, event_type="fine_tuning.job.succeeded")
        signed_twice = second.requests[-1]
        assert len(signed_twice.headers["webhook-signature"].split(" ")) == 2
        for secret in (created.signing_secret, kept.signing_secret):
            client.webhooks.unwrap(signed_twice.body, signed_twice.headers, secret=secret)
        # Rotation without it: the previous secrets verify nothing from now on.
        fresh = client.webhooks.rotate_secret(created.id)
        client.webhooks.test(created.id, event_type="fine_tuning.job.succeeded")
        signed_once = second.requests[-1]
        client.webhooks.unwrap(signed_once.body, signed_once.headers, secret=fresh.signing_secret)
        for old in (created.signing_secret, kept.signing_secret):
            with pytest.raises(InvalidWebhookSignatureError):
                client.webhooks.unwrap(signed_once.body, signed_once.headers, secret=old)
        assert (
            fresh.signing_secret not in svc.http.get(f"/v1/webhook_endpoints/{created.id}", headers=tenant.headers).text
        )

        # A receiver that is not there: 422 saying so, nothing recorded.
        down = client.webhooks.update(created.id, url=f"http://127.0.0.1:{free_port()}/hook")
        unreachable = svc.http.post(
            f"/v1/webhook_endpoints/{down.id}/test",
            headers=tenant.headers,
            json={"event_type": "fine_tuning.job.succeeded"},
        )
        assert unreachable.status_code == 422, unreachable.text
        assert unreachable.json()["error"]["code"] == "webhook_unreachable"
        assert "could not connect" in unreachable.json()["error"]["message"]


def test_bad_endpoints_are_refused_naming_the_field(settings: Settings, tenant: Tenant) -> None:
    ok = "http://127.0.0.1:9/hook"
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"url": ok, "events": ["fine_tuning.job.paused"]}, "events", "invalid_value"),
        ({"url": ok, "events": []}, "events", "invalid_value"),
        ({"url": ok, "events": EVENTS + EVENTS[:1]}, "events", "invalid_value"),  # more than there are
        ({"url": ok, "events": EVENTS[:1], "event_types": EVENTS[:1]}, "events", "invalid_value"),
        ({"url": "ftp://127.0.0.1/hook"}, "url", "invalid_value"),
        ({"url": "127.0.0.1/hook"}, "url", "invalid_value"),
        ({"url": "http://127.0.0.1/" + "a" * 2048}, "url", "invalid_value"),
        ({"url": "http://no-such-host.invalid/hook"}, "url", "invalid_value"),
        ({"url": ok, "name": "n" * 201}, "name", "invalid_value"),
        ({"url": ok, "secret": "whsec_mine"}, "secret", "invalid_value"),
        ({"events": EVENTS}, "url", "missing_field"),
    ]
    with service(settings, webhook_max_endpoints_per_tenant=2) as svc:
        for body, param, code in cases:
            r = svc.http.post("/v1/webhook_endpoints", headers=tenant.headers, json=body)
            assert r.status_code == 422, (body, r.text)
            assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code), body
            assert "Traceback" not in r.text and "/work" not in r.text
        assert svc.http.get("/v1/webhook_endpoints", headers=tenant.headers).json()["data"] == []

        first = svc.add(tenant, url=ok)
        svc.add(tenant, url=ok, events=EVENTS[:1])
        r = svc.http.post("/v1/webhook_endpoints", headers=tenant.headers, json={"url": ok})
        assert r.status_code == 409 and r.json()["error"]["code"] == "too_many_webhook_endpoints"
        svc.http.delete(f"/v1/webhook_endpoints/{first['id']}", headers=tenant.headers)
        svc.add(tenant, url=ok)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/hook",
        "https://192.168.0.10/hook",
        "http://0.0.0.0/hook",
    ],
)
def test_private_addresses_are_refused_unless_the_operator_allows_them(
    settings: Settings, tenant: Tenant, url: str
) -> None:
    with service(settings, webhook_allow_private_urls=False) as svc:
        r = svc.http.post("/v1/webhook_endpoints", headers=tenant.headers, json={"url": url})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert (error["param"], error["code"]) == ("url", "webhook_url_not_allowed")
        assert "TUNEFORGE_WEBHOOK_ALLOW_PRIVATE_URLS=true" in error["message"]
    with service(settings, webhook_allow_private_urls=True) as svc:
        svc.add(tenant, url=url)


def test_an_endpoint_that_became_private_is_not_sent_to(settings: Settings, tenant: Tenant) -> None:
    """The address is checked again at each delivery: an endpoint registered while the operator allowed private
    addresses (or whose name resolves elsewhere now) gets nothing once they are refused."""
    with Receiver() as receiver:
        with service(settings, webhook_poll_seconds=0) as svc:
            endpoint = svc.add(tenant, url=receiver.url)
            svc.cancelled_job(tenant)
        with service(settings, webhook_allow_private_urls=False) as svc:
            [delivery] = wait_until(lambda: [d for d in svc.deliveries(tenant, endpoint["id"]) if d["last_error"]])
        assert delivery["status"] == "pending" and delivery["last_status_code"] is None
        assert "private, loopback or link-local address" in delivery["last_error"]
        assert receiver.requests == []


def test_another_tenant_can_neither_see_nor_remove_an_endpoint(
    settings: Settings, tenant: Tenant, make_tenant: Callable[[], Tenant]
) -> None:
    other = make_tenant()
    with Receiver() as receiver, service(settings) as svc:
        endpoint = svc.add(tenant, url=receiver.url)
        for method, path in (
            ("GET", f"/v1/webhook_endpoints/{endpoint['id']}"),
            ("GET", f"/v1/webhook_endpoints/{endpoint['id']}/deliveries"),
            ("DELETE", f"/v1/webhook_endpoints/{endpoint['id']}"),
        ):
            r = svc.http.request(method, path, headers=other.headers)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path)
        assert svc.http.get("/v1/webhook_endpoints", headers=other.headers).json()["data"] == []

        svc.cancelled_job(other)  # another tenant's job: not this endpoint's event
        mine = svc.cancelled_job(tenant)
        [received] = receiver.wait(1)
        time.sleep(0.5)
        assert len(receiver.requests) == 1 and json.loads(received.body)["data"] == {"id": mine}
        assert [e["id"] for e in svc.http.get("/v1/webhook_endpoints", headers=tenant.headers).json()["data"]] == [
            endpoint["id"]
        ]


# --- delivery -----------------------------------------------------------------------------------------------
def test_a_job_that_ends_is_sent_signed_to_each_subscribed_endpoint(settings: Settings, tenant: Tenant) -> None:
    with Receiver() as everything, Receiver() as successes, service(settings) as svc:
        client = svc.openai(tenant)
        all_events = client.webhooks.create(url=everything.url, name="all", event_types=EVENTS)  # type: ignore[arg-type]
        only_successes = svc.add(tenant, url=successes.url, events=["fine_tuning.job.succeeded"])

        cancelled = svc.cancelled_job(tenant)
        failed = start_job(svc.http, tenant, UNTRAINABLE, max_seq_length=16)  # type: ignore[arg-type]
        assert run_training_job(svc.settings, failed) is None
        succeeded = start_job(svc.http, tenant, chat_lines(4), n_epochs=1)  # type: ignore[arg-type]
        assert run_training_job(svc.settings, succeeded) is not None

        received = everything.wait(3)
        events = [client.webhooks.unwrap(r.body, r.headers, secret=all_events.signing_secret) for r in received]
        by_job = {event.data.id: event for event in events}  # type: ignore[union-attr]
        assert isinstance(by_job[cancelled], FineTuningJobCancelledWebhookEvent)
        assert isinstance(by_job[failed], FineTuningJobFailedWebhookEvent)
        assert isinstance(by_job[succeeded], FineTuningJobSucceededWebhookEvent)
        for r in received:  # as sent, each payload validates against OpenAI's published schema of its event
            payload = json.loads(r.body)
            check(f"WebhookFineTuningJob{payload['type'].rsplit('.', 1)[1].capitalize()}", payload)
        for event in events:
            assert event.object == "event" and event.id.startswith("evt_")  # type: ignore[union-attr]
            assert abs(event.created_at - time.time()) < 300  # type: ignore[union-attr]
        with pytest.raises(InvalidWebhookSignatureError):
            client.webhooks.unwrap(received[0].body, received[0].headers, secret=only_successes["secret"])

        [success] = successes.wait(1)
        event = client.webhooks.unwrap(success.body, success.headers, secret=only_successes["secret"])
        assert isinstance(event, FineTuningJobSucceededWebhookEvent) and event.data.id == succeeded
        assert event.id == by_job[succeeded].id  # one event, sent to two endpoints
        time.sleep(0.5)
        assert len(successes.requests) == 1 and len(everything.requests) == 3  # nothing else, nothing twice

        deliveries = svc.deliveries(tenant, all_events.id)
        assert {d["id"] for d in deliveries} == {r.headers["webhook-id"] for r in received}
        for d in deliveries:
            assert (d["status"], d["attempts"], d["last_status_code"], d["last_error"]) == ("delivered", 1, 200, None)
            assert d["delivered_at"] >= d["created_at"] and d["next_attempt_at"] is None
            assert d["event"] == json.loads(next(r.body for r in received if r.headers["webhook-id"] == d["id"]))


def test_a_receiver_down_at_first_gets_the_event_later_with_the_same_webhook_id(
    settings: Settings, tenant: Tenant
) -> None:
    receiver = Receiver(statuses=[500])  # not listening yet; once it is, it answers 500 first
    with service(settings) as svc:
        endpoint = svc.add(tenant, url=receiver.url)
        job_id = svc.cancelled_job(tenant)
        [refused] = wait_until(lambda: [d for d in svc.deliveries(tenant, endpoint["id"]) if d["attempts"] >= 2])
        assert (refused["status"], refused["last_status_code"]) == ("pending", None)
        assert refused["last_error"] == "could not connect to the URL's host"
        assert refused["next_attempt_at"] is not None and refused["delivered_at"] is None

        with receiver:
            received = receiver.wait(2)
            [delivered] = wait_until(lambda: [d for d in svc.deliveries(tenant, endpoint["id"]) if d["delivered_at"]])
        assert [r.headers["webhook-id"] for r in received] == [refused["id"]] * 2
        assert received[0].body == received[1].body
        for r in received:
            event = svc.openai(tenant).webhooks.unwrap(r.body, r.headers, secret=endpoint["secret"])
            assert isinstance(event, FineTuningJobCancelledWebhookEvent) and event.data.id == job_id
        # At least one attempt found nothing listening, then one was answered 500 and the last 200.
        assert delivered["status"] == "delivered" and delivered["attempts"] >= 3 and len(receiver.requests) == 2
        assert delivered["last_status_code"] == 200
        assert delivered["last_error"] is None and delivered["next_attempt_at"] is None


def test_deliveries_recorded_before_a_restart_are_sent_by_the_next_process(settings: Settings, tenant: Tenant) -> None:
    receiver = Receiver()
    with service(settings, webhook_poll_seconds=0) as svc:  # this process sends nothing, then stops
        endpoint = svc.add(tenant, url=receiver.url)
        job_id = svc.cancelled_job(tenant)
        [recorded] = svc.deliveries(tenant, endpoint["id"])
        assert (recorded["status"], recorded["attempts"], recorded["event"]["data"]) == ("pending", 0, {"id": job_id})
    with receiver, service(settings) as svc:
        [received] = receiver.wait(1)
        assert received.headers["webhook-id"] == recorded["id"]
        event = svc.openai(tenant).webhooks.unwrap(received.body, received.headers, secret=endpoint["secret"])
        assert isinstance(event, FineTuningJobCancelledWebhookEvent) and event.data.id == job_id


def test_concurrent_senders_send_each_delivery_once(settings: Settings, tenant: Tenant) -> None:
    with Receiver(delay=0.2) as receiver, service(settings, webhook_poll_seconds=0) as svc:
        endpoint = svc.add(tenant, url=receiver.url)
        for _ in range(4):
            svc.cancelled_job(tenant)
        recorded = {d["id"] for d in svc.deliveries(tenant, endpoint["id"])}
        start = threading.Barrier(3)

        def sender() -> None:
            start.wait()
            while deliver_due(svc.settings):
                pass

        threads = [threading.Thread(target=sender) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(r.headers["webhook-id"] for r in receiver.requests) == sorted(recorded)
        assert [d["status"] for d in svc.deliveries(tenant, endpoint["id"])] == ["delivered"] * 4


def test_a_slow_receiver_times_out_and_an_answer_body_is_never_read(settings: Settings, tenant: Tenant) -> None:
    with (
        Receiver(delay=5) as slow,
        Receiver(endless_body=True) as endless,
        service(settings, webhook_timeout_seconds=0.5) as svc,
    ):
        slow_endpoint = svc.add(tenant, url=slow.url)
        endless_endpoint = svc.add(tenant, url=endless.url)
        started = time.monotonic()
        svc.cancelled_job(tenant)
        [timed_out] = wait_until(lambda: [d for d in svc.deliveries(tenant, slow_endpoint["id"]) if d["last_error"]])
        [answered] = wait_until(
            lambda: [d for d in svc.deliveries(tenant, endless_endpoint["id"]) if d["status"] == "delivered"]
        )
        assert time.monotonic() - started < 4  # well before the slow receiver answers
        assert (timed_out["last_error"], timed_out["last_status_code"]) == ("no answer within 0.5 s", None)
        assert (answered["status"], answered["last_status_code"]) == ("delivered", 200)


def test_a_delivery_is_given_up_once_its_retry_window_closes(settings: Settings, tenant: Tenant) -> None:
    with Receiver(statuses=[503] * 100) as receiver, service(settings, webhook_retry_seconds=1) as svc:
        endpoint = svc.add(tenant, url=receiver.url)
        svc.cancelled_job(tenant)
        [failed] = wait_until(lambda: [d for d in svc.deliveries(tenant, endpoint["id"]) if d["status"] == "failed"])
        assert failed["attempts"] >= 2 and failed["attempts"] == len(receiver.requests)
        assert (failed["last_status_code"], failed["last_error"]) == (503, "the receiver answered HTTP 503")
        assert failed["next_attempt_at"] is None and failed["delivered_at"] is None
        time.sleep(1)
        assert len(receiver.requests) == failed["attempts"]  # no attempt after it failed


# --- the command line ---------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_cli_adds_lists_and_removes_endpoints(settings: Settings, tenant: Tenant) -> None:
    with Receiver() as receiver, service(settings) as svc:
        cli = Cli(svc.url, tenant.key)
        added = cli("webhooks", "add", receiver.url, "--event", "fine_tuning.job.cancelled", "--name", "ci")
        assert added.returncode == 0, added.stderr
        endpoint_id = added.stdout.strip()
        secret = added.stderr.split("signing secret (shown once): ", 1)[1].split()[0]
        assert endpoint_id.startswith("webhook-") and secret.startswith("whsec_")

        assert [e["id"] for e in cli.json("webhooks", "list")["data"]] == [endpoint_id]
        table = cli.ok("webhooks", "list")
        assert endpoint_id in table and "fine_tuning.job.cancelled" in table and secret not in table

        job_id = svc.cancelled_job(tenant)
        [received] = receiver.wait(1)
        assert svc.openai(tenant).webhooks.unwrap(received.body, received.headers, secret=secret).data.id == job_id
        wait_until(lambda: cli.json("webhooks", "deliveries", endpoint_id)["data"][0]["status"] == "delivered")
        assert job_id in cli.ok("webhooks", "deliveries", endpoint_id)

        bad = cli("webhooks", "add", receiver.url, "--event", "fine_tuning.job.paused")
        assert bad.returncode == 1 and bad.stderr.startswith("error: events: unknown event 'fine_tuning.job.paused'")
        assert cli.ok("webhooks", "remove", endpoint_id).strip() == f"webhook endpoint {endpoint_id}: removed"
        gone = cli("webhooks", "remove", endpoint_id)
        assert gone.returncode == 1 and "no webhook endpoint" in gone.stderr
