"""What the engine sends back: each row's sampled token, its text decoded incrementally, stop strings, streamed
deltas, log-probabilities, and the result (or the error) that ends a request."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.ml.serving.kinds import Servable
from app.ml.serving.logits import GrammarFailed, RowProcessor, process
from app.ml.serving.requests import Delta, Generation, GenerationRequest, GenerationResult, TokenLogprob
from app.ml.serving.sampling import Sampler

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class Row:
    """A request in the running batch."""

    generation: Generation
    servable: Servable | None
    sampler: Sampler
    position: int  # the position of the next token fed to the model
    processor: RowProcessor | None = None  # penalties, logit bias, grammar (None: the logits as the model gives)
    error: Exception | None = None  # the row failed (its grammar could not go on): it leaves, its request fails
    last: int = 0  # the token to feed next
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    sent: int = 0  # characters of text streamed so far
    sent_tokens: int = 0  # tokens (and their log-probabilities) streamed so far
    text: str = ""  # decoded so far (up to `read_offset`)
    prefix_offset: int = 0  # incremental decoding, as vLLM's: ids[prefix_offset:read_offset] were decoded last
    read_offset: int = 0
    finish_reason: str | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.generation.request


def sample(rows: list[Row], logits: torch.Tensor, tokenizer: Any) -> list[int]:
    """Each row's next token (greedy or with its own sampler) from its logits changed as its processor says, with
    its log-probability under the model where asked for."""
    import torch

    logits = logits.float()
    logprobs = None
    if any(row.logprobs is not None for row in rows):
        logprobs = torch.log_softmax(logits, dim=-1)  # the model's own, before any change
    for i in process(logits, [row.processor for row in rows]):
        rows[i].error = GrammarFailed("the output could not be kept to its response format")
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for i, row in enumerate(rows):
        token = greedy[i] if row.request.greedy else row.sampler.sample(logits[i])
        if row.logprobs is not None and logprobs is not None:
            row.logprobs.append(_logprob(tokenizer, logprobs[i], token, row.request.logprobs or 0))
        tokens.append(token)
    return tokens


def emit(row: Row, token: int, *, tokenizer: Any, eos: set[int]) -> None:
    """Record a generated token; stream new text; finish the row at an end of sequence, a stop string, its grammar
    complete or max_tokens (or fail it, its grammar unable to go on)."""
    request = row.request
    row.ids.append(token)
    row.last = token
    complete = False
    if row.processor is not None and row.error is None:
        try:
            complete = row.processor.accept(token)
        except GrammarFailed as exc:
            row.error = exc
    if row.error is not None:
        row.finish_reason = "error"
        fail(row.generation, row.error)
        return
    finish = None
    if (token in eos and not request.ignore_eos) or complete:
        finish = "stop"
    elif len(row.ids) >= request.max_tokens:
        finish = "length"
    streaming = row.generation.on_delta is not None
    if streaming or request.stop or finish:
        searched = len(row.text)
        _decode(tokenizer, row, final=finish is not None, eos=eos)
        for stop in request.stop:
            cut = row.text.find(stop, max(0, searched - len(stop) + 1))
            if cut != -1:
                row.text = row.text[:cut]
                finish = "stop"
    if finish is not None:
        finish_row(row, finish)
    elif streaming:
        ready = len(row.text) - _held_back(row.text, request.stop)
        if ready > row.sent:
            _send(row, _delta(row, row.text[row.sent : ready]))
            row.sent = ready


def finish_row(row: Row, reason: str) -> None:
    """End the row's request: its last delta (streaming) and its result."""
    row.finish_reason = reason
    if reason == "cancelled":
        row.text = row.text[: row.sent]
    _send(row, _delta(row, row.text[row.sent :], reason))
    row.sent = len(row.text)
    result = GenerationResult(
        text=row.text,
        token_ids=list(row.ids),
        prompt_tokens=len(row.request.input_ids),
        completion_tokens=len(row.ids),
        finish_reason=reason,
        logprobs=row.logprobs,
    )
    if not row.generation.future.done():
        row.generation.future.set_result(result)


def fail(generation: Generation, exc: BaseException) -> None:
    """End a request with an error (its caller raises it)."""
    future = generation.future
    if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
        future.set_exception(exc)


def finish_cancelled(generation: Generation) -> None:
    """End a request cancelled before it ran: an empty result."""
    if not generation.future.done() and generation.future.set_running_or_notify_cancel():
        request = generation.request
        generation.future.set_result(
            GenerationResult(
                text="",
                token_ids=[],
                prompt_tokens=len(request.input_ids),
                completion_tokens=0,
                finish_reason="cancelled",
            )
        )


def _decode(tokenizer: Any, row: Row, final: bool, eos: set[int]) -> None:
    """Decode the tokens generated since the last call onto `row.text`, a few tokens at a time whatever the
    length (the previous piece is decoded again, so that a piece starting inside a word, or a character split
    over tokens, comes out as in decoding the whole); `final` flushes an unfinished character too. Special tokens
    are left out, or (`special_tokens`) only the end of sequence."""
    special = row.request.special_tokens

    def decode(ids: list[int]) -> str:
        if special:
            ids = [i for i in ids if i not in eos]
        return str(tokenizer.decode(ids, skip_special_tokens=not special, clean_up_tokenization_spaces=False))

    before = decode(row.ids[row.prefix_offset : row.read_offset])
    after = decode(row.ids[row.prefix_offset :])
    if len(after) > len(before) and (final or not after.endswith("\ufffd")):
        row.text += after[len(before) :]
        row.prefix_offset, row.read_offset = row.read_offset, len(row.ids)


def _delta(row: Row, text: str, finish_reason: str | None = None) -> Delta:
    """The next delta: `text`, with the tokens (and log-probabilities) generated since the last one."""
    start, row.sent_tokens = row.sent_tokens, len(row.ids)
    logprobs = row.logprobs[start:] if row.logprobs is not None else None
    return Delta(text=text, token_ids=row.ids[start:], logprobs=logprobs, finish_reason=finish_reason)


def _send(row: Row, delta: Delta) -> None:
    if row.generation.on_delta is None:
        return
    try:
        row.generation.on_delta(delta)
    except Exception:  # a listener's failure (its client went away) cancels only its request
        log.debug("a delta listener failed; cancelling its request", exc_info=True)
        row.generation.cancel()


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop string: not streamed until known."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def _logprob(tokenizer: Any, logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    import torch

    alternatives: list[tuple[str, int, float]] = []
    if top:
        values, indices = torch.topk(logprobs, top)
        alternatives = [(tokenizer.decode([i]), i, v) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    return TokenLogprob(
        token=tokenizer.decode([token]), token_id=token, logprob=float(logprobs[token]), top=alternatives
    )
