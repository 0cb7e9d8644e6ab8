"""Receive a multipart upload as it streams in: the file part goes to a scratch file, small fields to memory.

FastAPI's `UploadFile` would parse the whole body (spooling it to the system /tmp) before the route runs;
this reads it only once the request is authenticated, counts every byte, and keeps the file in the data
dir in an anonymous temporary file, which the kernel removes however the request ends.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.errors import ErrorCode, InvalidInput, RequestTimeout

FILE_FIELD = "file"
MAX_FIELDS = 8
MAX_FIELD_BYTES = 1024


class MalformedUpload(InvalidInput):
    code = ErrorCode.invalid_multipart


@dataclass
class ReceivedUpload:
    file: IO[bytes] | None = None  # the `file` part, rewound; None if the request had none
    filename: str | None = None
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)


class _Receiver:
    """python-multipart callbacks; file bytes are queued and written off the event loop by `receive`."""

    def __init__(self, scratch_dir: Path) -> None:
        self.scratch_dir = scratch_dir
        self.upload = ReceivedUpload()
        self.part = _Part()
        self.header_name = b""
        self.header_value = b""
        self.pending: list[bytes] = []
        self.n_fields = 0

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self.header_name.lower()] = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition"))
        if b"name" not in options:
            raise MalformedUpload("a multipart part has no name", param=None)
        self.part.name = options[b"name"].decode("utf-8", "replace")
        if self.part.name == FILE_FIELD:
            if self.upload.file is not None:
                raise MalformedUpload("send exactly one file in the `file` field", param="file")
            self.part.is_file = True
            self.upload.filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.upload.file = tempfile.TemporaryFile(dir=self.scratch_dir)  # noqa: SIM115 (closed by the caller)
        else:
            self.n_fields += 1
            if self.n_fields > MAX_FIELDS:
                raise MalformedUpload(f"at most {MAX_FIELDS} form fields besides the file", param=None)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.is_file:
            self.pending.append(data[start:end])
            self.upload.size += end - start
            return
        self.part.data += data[start:end]
        if len(self.part.data) > MAX_FIELD_BYTES:
            raise MalformedUpload(f"form field {self.part.name[:40]!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if not self.part.is_file:
            self.upload.fields[self.part.name] = self.part.data.decode("utf-8", "replace")


async def receive_upload(
    content_type: str | None, stream: AsyncIterator[bytes], *, scratch_dir: Path
) -> ReceivedUpload:
    """Parse a `multipart/form-data` body; the caller closes the returned upload (its file is then gone)."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise InvalidInput(
            "the request has no `file` part: send the JSONL file as multipart/form-data (curl -F file=@train.jsonl)",
            param="file",
            code=ErrorCode.missing_field,
        )
    scratch_dir.mkdir(parents=True, exist_ok=True)
    receiver = _Receiver(scratch_dir)
    parser = MultipartParser(
        options[b"boundary"],
        {  # type: ignore[arg-type]
            "on_part_begin": receiver.on_part_begin,
            "on_header_field": receiver.on_header_field,
            "on_header_value": receiver.on_header_value,
            "on_header_end": receiver.on_header_end,
            "on_headers_finished": receiver.on_headers_finished,
            "on_part_data": receiver.on_part_data,
            "on_part_end": receiver.on_part_end,
        },
    )
    try:
        async for chunk in stream:
            parser.write(chunk)
            if receiver.pending and receiver.upload.file is not None:
                data, receiver.pending = b"".join(receiver.pending), []
                await anyio.to_thread.run_sync(receiver.upload.file.write, data)
        parser.finalize()
    except FormParserError as exc:
        receiver.upload.close()
        raise MalformedUpload("the multipart body is malformed", param="file") from exc
    except BaseException:
        receiver.upload.close()
        raise
    if receiver.upload.file is not None:
        receiver.upload.file.seek(0)
    return receiver.upload


async def paced(
    stream: AsyncIterator[bytes], *, grace_seconds: float, min_bytes_per_second: int
) -> AsyncIterator[bytes]:
    """The body's chunks, cut off with a 408 once the client falls behind: it may take `grace_seconds` to send
    anything, and from then on must have sent `min_bytes_per_second` for every second past them. So a client that
    sends a byte a second holds its request (and its tenant's upload slot) for `grace_seconds` at most."""
    started = time.monotonic()
    received = 0
    chunks = aiter(stream)
    while True:
        deadline = started + grace_seconds + received / min_bytes_per_second
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(
                f"the upload was cut off after {received:,} bytes in {time.monotonic() - started:.0f} s: send the "
                f"file faster than {min_bytes_per_second:,} bytes a second",
                param="file",
                code=ErrorCode.upload_too_slow,
            ) from None
        received += len(chunk)
        yield chunk
