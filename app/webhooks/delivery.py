"""The delivery loop: sends the outbox's due deliveries, signed as OpenAI signs its webhooks, and records each
attempt; every API and worker process runs one (`WebhookSender`), and any number may run at once.

Signing is Standard Webhooks' (the `standardwebhooks` package): headers `webhook-id` (the delivery's id, the same on
every attempt), `webhook-timestamp` (this attempt's Unix time) and `webhook-signature` (`v1,` + base64 of the
HMAC-SHA256 of `{id}.{timestamp}.{body}` keyed with the secret's bytes after `whsec_`).

At least once: a delivery is claimed for one attempt by a conditional UPDATE (app/webhooks/repository.py) that
also moves its next attempt past the attempt's longest duration, committed before anything is sent, so two
senders never send it at once and a sender that dies mid-attempt leaves it to be sent again. A receiver that does
not answer 2xx gets it again after `webhook_retry_initial_seconds`, doubling (up to an hour), for
`webhook_retry_seconds` after the event. An attempt takes at most `webhook_timeout_seconds` in all; it connects to
the address it checked (`app/webhooks/addresses.py`), follows no redirect, and never reads the answer's body.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import anyio.to_thread
import httpx
from standardwebhooks import Webhook

from app.core.db import session_scope
from app.core.settings import Settings
from app.webhooks import repository
from app.webhooks.addresses import AddressRefused, parse_url, resolve
from app.webhooks.outbox import register_wakeup, unregister_wakeup
from app.webhooks.repository import ClaimedDelivery

log = logging.getLogger(__name__)

SENDS_AT_ONCE = 16  # deliveries one sender attempts together (one slow receiver does not hold up the others)
MAX_RETRY_INTERVAL_SECONDS = 3600.0
LEASE_MARGIN_SECONDS = 60.0  # past an attempt's longest duration, before another sender may take it again
USER_AGENT = "Tuneforge-Webhooks/1"


@dataclass(frozen=True)
class AttemptResult:
    delivered: bool
    status_code: int | None = None  # the receiver's answer, if it gave one
    error: str | None = None  # why it failed, for the user: no internals


def retry_delay(settings: Settings, attempt: int) -> float:
    """Seconds from the end of failed attempt number `attempt` (1, 2, …) to the next."""
    return float(min(settings.webhook_retry_initial_seconds * 2 ** (attempt - 1), MAX_RETRY_INTERVAL_SECONDS))


def signed_headers(delivery: ClaimedDelivery, *, now: datetime) -> dict[str, str]:
    """Standard Webhooks' headers; `webhook-signature` holds one `v1,…` signature per secret, space-separated (a
    receiver verifies with the one it has)."""
    signature = " ".join(Webhook(secret).sign(delivery.id, now, delivery.payload) for secret in delivery.secrets)
    return {
        "webhook-id": delivery.id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


async def attempt(client: httpx.AsyncClient, delivery: ClaimedDelivery, settings: Settings) -> AttemptResult:
    """One attempt to send the delivery, within `webhook_timeout_seconds` all told."""
    timeout = settings.webhook_timeout_seconds
    with anyio.move_on_after(timeout):
        try:
            url = parse_url(delivery.url)
            check = functools.partial(resolve, url, allow_private=settings.webhook_allow_private_urls, timeout=timeout)
            addresses = await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
        except AddressRefused as exc:
            return AttemptResult(False, error=str(exc)[:200])
        host = url.raw_host.decode("ascii")
        headers = {**signed_headers(delivery, now=datetime.now(UTC)), "host": url.netloc.decode("ascii")}
        # The address checked, not the name again: TLS still verifies the certificate against the name (SNI).
        request = client.build_request(
            "POST",
            url.copy_with(host=str(addresses[0])),
            content=delivery.payload.encode(),
            headers=headers,
            extensions={"sni_hostname": host} if url.scheme == "https" else {},
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.TimeoutException:
            return AttemptResult(False, error=f"no answer within {timeout:g} s")
        except httpx.ConnectError:
            return AttemptResult(False, error="could not connect to the URL's host")
        except httpx.HTTPError as exc:  # the protocol broke: a reset, a malformed answer
            return AttemptResult(False, error=f"the request failed: {type(exc).__name__}")
        await response.aclose()  # the body is never read: only the status line and the headers
        code = response.status_code
        if 200 <= code < 300:
            return AttemptResult(True, status_code=code)
        return AttemptResult(False, status_code=code, error=f"the receiver answered HTTP {code}")
    return AttemptResult(False, error=f"no answer within {timeout:g} s")


async def _send_all(claimed: list[ClaimedDelivery], settings: Settings) -> list[AttemptResult]:
    results = [AttemptResult(False, error="not attempted")] * len(claimed)

    async def send(index: int, client: httpx.AsyncClient) -> None:
        results[index] = await attempt(client, claimed[index], settings)

    # No proxy from the environment (it would reach what the address check refuses), no redirects.
    client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=settings.webhook_timeout_seconds)
    async with client, anyio.create_task_group() as group:
        for index in range(len(claimed)):
            group.start_soon(send, index, client)
    return results


def send_now(delivery: ClaimedDelivery, settings: Settings) -> AttemptResult:
    """One attempt at `delivery`, now, in this thread (a test event: nothing is recorded)."""
    return anyio.run(_send_all, [delivery], settings)[0]


def deliver_due(settings: Settings) -> int:
    """One round: claim up to SENDS_AT_ONCE due deliveries, attempt them together, record each attempt; how many
    were attempted. No database connection is held while sending."""
    lease = settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS
    with session_scope(settings.db_url) as session:
        claimed = repository.claim_due(session, limit=SENDS_AT_ONCE, lease_seconds=lease)
    if not claimed:
        return 0
    results = anyio.run(_send_all, claimed, settings)
    for delivery, result in zip(claimed, results, strict=True):
        with session_scope(settings.db_url) as session:
            repository.record_attempt(
                session,
                delivery,
                delivered=result.delivered,
                status_code=result.status_code,
                error=result.error,
                retry_in=retry_delay(settings, delivery.attempt),
                retry_seconds=settings.webhook_retry_seconds,
            )
        if result.delivered:
            log.info("webhook %s delivered (attempt %d)", delivery.id, delivery.attempt)
        else:
            log.warning("webhook %s: attempt %d failed: %s", delivery.id, delivery.attempt, result.error)
    return len(claimed)


class WebhookSender:
    """Runs `deliver_due` in a daemon thread for as long as the context is open: at once, after each event this
    process commits, and every `webhook_poll_seconds` (0: never; then the context does nothing)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)

    def __enter__(self) -> WebhookSender:
        if self.settings.webhook_poll_seconds > 0:
            register_wakeup(self._wake)
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._wake.set()
        unregister_wakeup(self._wake)
        if self._thread.is_alive():
            self._thread.join(timeout=self.settings.webhook_timeout_seconds + 30)

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                while deliver_due(self.settings) == SENDS_AT_ONCE and not self._done.is_set():
                    pass  # a full round: more may be due
            except Exception as exc:  # the database is away: the next round tries again
                log.warning("webhook deliveries: %s", type(exc).__name__)
            self._wake.wait(self.settings.webhook_poll_seconds)
            self._wake.clear()
