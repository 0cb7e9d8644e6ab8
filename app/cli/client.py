"""A small typed HTTP client of the Tuneforge API (httpx), for the `tuneforge` client commands and scripts.

Every failure is a `ClientError`: `ApiError` when the API answered with an error (its status and the
`{"error": {"message", "param", "code"}}` body), `ApiUnreachable` when it did not answer at all.
Kept free of the server's imports (torch, SQLAlchemy), so that a command starts in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8000"
TIMEOUT_SECONDS = 30.0
# Generous where the server works before it answers: an upload is validated line by line, a first generation
# may load a base model; a stream is silent between events (the server sends a keep-alive every 15 s).
UPLOAD_TIMEOUT_SECONDS = 600.0
STREAM_READ_TIMEOUT_SECONDS = 600.0
DOWNLOAD_CHUNK_BYTES = 1 << 20


class ClientError(Exception):
    """A failure the command reports in one line on stderr, with exit code 1."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ApiUnreachable(ClientError):
    """No answer: the connection was refused or dropped, or the server took too long."""


class ApiError(ClientError):
    """The API answered with an error status; `body` is its JSON body (an upload's `report` is in it)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param
        self.code = code
        self.body = body or {}

    @property
    def report(self) -> dict[str, Any] | None:
        """A rejected upload's validation report: `n_lines`, `n_errors`, `errors` (`line`, `code`, `message`)."""
        report = self.body.get("error", {}).get("report")
        return report if isinstance(report, dict) else None


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None = None


def iter_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Server-sent events from the stream's lines (the text/event-stream format; comments and `retry` skipped)."""
    event, ident = "", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data), ident)
            event, data, ident = "", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            ident = value
    if data:
        yield ServerSentEvent(event or "message", "\n".join(data), ident)


def installed_version() -> str | None:
    """The installed `tuneforge` package's version; None in a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tuneforge")
    except PackageNotFoundError:
        return None


class TuneforgeClient:
    """The API at `base_url` (its root: `http://host:8000`), as the tenant whose key is `api_key`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = TIMEOUT_SECONDS,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={
                "Authorization": f"Bearer {api_key}",
                "User-Agent": f"tuneforge-cli/{installed_version() or 'unknown'}",
            },
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> TuneforgeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- plumbing ----------------------------------------------------------------------------------------------
    @contextmanager
    def _transport_errors(self, timeout: float) -> Iterator[None]:
        """httpx's errors of the connection as ApiUnreachable, with what to do about them."""
        try:
            yield
        except httpx.ConnectError:
            raise ApiUnreachable(
                f"cannot reach the Tuneforge API at {self.base_url} (set --api-url or TUNEFORGE_API_URL)"
            ) from None
        except httpx.TimeoutException:
            raise ApiUnreachable(f"the Tuneforge API at {self.base_url} did not answer within {timeout:g} s") from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            raise ApiUnreachable(
                f"{self.base_url!r} is not an http(s) URL (set --api-url or TUNEFORGE_API_URL)"
            ) from None
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"the connection to the Tuneforge API at {self.base_url} failed: {exc}") from None

    def _check(self, response: httpx.Response) -> None:
        """Raise ApiError for an error status, with the message of the API's error body when there is one."""
        if response.status_code < 400:
            return
        response.read()
        try:
            body = response.json()
            error = body["error"]
            message = str(error["message"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(
                response.status_code,
                f"HTTP {response.status_code} from {response.request.url} without a Tuneforge error body "
                "(is --api-url / TUNEFORGE_API_URL the Tuneforge API?)",
            ) from None
        raise ApiError(response.status_code, message, param=error.get("param"), code=error.get("code"), body=body)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        timeout = kwargs.get("timeout", self.timeout)
        with self._transport_errors(timeout):
            response = self._http.request(method, path, **kwargs)
        self._check(response)
        return response

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        timeout = httpx.Timeout(self.timeout, read=STREAM_READ_TIMEOUT_SECONDS)
        with (
            self._transport_errors(STREAM_READ_TIMEOUT_SECONDS),
            self._http.stream(method, path, timeout=timeout, **kwargs) as response,
        ):
            self._check(response)
            yield response

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                f"the answer from {response.request.url} is not JSON (is --api-url / TUNEFORGE_API_URL the "
                "Tuneforge API?)"
            ) from None

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET `path` (with the query `params` that are not None): the JSON answer."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return self._json(self._request("GET", path, params=query))

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._json(self._request("POST", path, json=body))

    def delete(self, path: str) -> Any:
        return self._json(self._request("DELETE", path))

    # --- the API -----------------------------------------------------------------------------------------------
    def upload_file(self, path: Path, *, purpose: str = "fine-tune", base_model: str | None = None) -> dict[str, Any]:
        """POST /v1/files: the file object; a file with bad lines raises ApiError (422) with its `report`."""
        fields = {"purpose": purpose} | ({"base_model": base_model} if base_model else {})
        with path.open("rb") as handle:
            response = self._request(
                "POST",
                "/v1/files",
                files={"file": (path.name, handle, "application/jsonl")},
                data=fields,
                timeout=httpx.Timeout(self.timeout, read=UPLOAD_TIMEOUT_SECONDS, write=UPLOAD_TIMEOUT_SECONDS),
            )
        return self._json(response)

    def download(self, path: str, destination: Path) -> tuple[int, str]:
        """GET `path` into `destination` (written beside it first, renamed once complete and checked against the
        `X-Content-SHA256` header): its size and sha256."""
        partial = destination.with_name(f".{destination.name}.partial")
        digest, size = hashlib.sha256(), 0
        try:
            with self._stream("GET", path) as response, partial.open("wb") as out:
                expected = response.headers.get("X-Content-SHA256")
                with self._transport_errors(STREAM_READ_TIMEOUT_SECONDS):
                    for chunk in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
            if expected and digest.hexdigest() != expected:
                raise ClientError(f"the download of {path} is damaged (sha256 mismatch); nothing was written")
            os.replace(partial, destination)
        finally:
            partial.unlink(missing_ok=True)
        return size, digest.hexdigest()

    def job_events(self, job_id: str, *, after: int = 0) -> Iterator[dict[str, Any]]:
        """The job's events after seq `after` as the server streams them, until the stream ends (the job ended, the
        server's limit on a stream's length, or a dropped connection: ApiUnreachable)."""
        params = {"stream": "true", "after": after}
        with (
            self._stream("GET", f"/jobs/{job_id}/events", params=params) as response,
            self._transport_errors(STREAM_READ_TIMEOUT_SECONDS),
        ):
            for sse in iter_sse(response.iter_lines()):
                yield json.loads(sse.data)

    def generate(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST /generate with `stream: true`: its `generation.chunk` objects, the last with `usage`; an error
        after the text began (an event with `error`) raises ApiError."""
        with (
            self._stream("POST", "/generate", json={**body, "stream": True}) as response,
            self._transport_errors(STREAM_READ_TIMEOUT_SECONDS),
        ):
            for sse in iter_sse(response.iter_lines()):
                if sse.data == "[DONE]":
                    return
                chunk = json.loads(sse.data)
                if "error" in chunk:
                    error = chunk["error"]
                    raise ApiError(
                        response.status_code,
                        str(error.get("message")),
                        param=error.get("param"),
                        code=error.get("code"),
                        body=chunk,
                    )
                yield chunk
