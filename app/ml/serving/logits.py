"""Per-row changes to the logits before sampling, inside a batch whose rows ask for different ones: OpenAI's
presence and frequency penalties, `logit_bias`, and a grammar's token mask (structured outputs). A row asking for
none has no processor and costs nothing; the rows that do are changed together, a few operations per step for all
of them (their masks computed on the host by llguidance, in parallel when several rows have one, while the device
still runs the step's forward pass: nothing before reads the logits back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.ml.serving.requests import GenerationRequest

if TYPE_CHECKING:
    import torch

_executor: Any = None  # llguidance's thread pool for many rows' masks at once, made on first use


class GrammarFailed(RuntimeError):
    """A row's grammar could not go on (its matcher hit a resource limit): only that request fails."""


class RowProcessor:
    """One row's logit changes and their state: how often it generated each token (penalties), its bias, its
    grammar matcher."""

    def __init__(self, request: GenerationRequest, *, vocab: int, device: Any) -> None:
        import torch

        self.presence = request.presence_penalty
        self.frequency = request.frequency_penalty
        self.counts: torch.Tensor | None = None  # [vocab] times each token was generated, on the device
        if self.presence or self.frequency:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.bias_ids: torch.Tensor | None = None
        self.bias_values: torch.Tensor | None = None
        bias = {token: value for token, value in request.logit_bias.items() if token < vocab and value}
        if bias:
            self.bias_ids = torch.tensor(list(bias), dtype=torch.long, device=device)
            self.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)
        self.matcher: Any = None
        self.grammar_vocab = 0  # the grammar's tokenizer's tokens (its masks' bits)
        if request.grammar is not None:
            self.matcher = request.grammar.matcher()
            self.grammar_vocab = request.grammar.vocab

    @classmethod
    def of(cls, request: GenerationRequest, *, vocab: int, device: Any) -> RowProcessor | None:
        """The row's processor, or None when its logits are sampled as the model gives them."""
        if not (request.presence_penalty or request.frequency_penalty or request.logit_bias or request.grammar):
            return None
        return cls(request, vocab=vocab, device=device)

    def accept(self, token: int) -> bool:
        """Record the sampled token; whether the row's grammar is now complete (nothing may follow)."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.matcher is None:
            return False
        if not self.matcher.consume_token(token):
            raise GrammarFailed("the output could not be kept to its response format")
        return bool(self.matcher.is_stopped())


def process(logits: torch.Tensor, processors: list[RowProcessor | None]) -> list[int]:
    """Change the rows' logits ([rows, vocabulary], float32) in place, each row as its processor says; returns the
    rows whose grammar failed (their logits are left as they were: the caller ends those requests)."""
    import torch

    rows = [(i, p) for i, p in enumerate(processors) if p is not None]
    if not rows:
        return []
    failed = []
    grammar_rows = [(i, p) for i, p in rows if p.matcher is not None]
    if grammar_rows:
        # Host work first, while the device may still run the forward pass.
        bitmask = _masks([p.matcher for _, p in grammar_rows], grammar_rows[0][1].grammar_vocab)
        for k, (i, p) in enumerate(grammar_rows):
            if p.matcher.is_error():
                failed.append(i)
                bitmask[k] = -1
    penalized = [(i, p) for i, p in rows if p.counts is not None]
    if penalized:
        index = torch.tensor([i for i, _ in penalized], device=logits.device)
        counts = torch.stack([p.counts for _, p in penalized if p.counts is not None])
        frequency = torch.tensor([p.frequency for _, p in penalized], device=logits.device)
        presence = torch.tensor([p.presence for _, p in penalized], device=logits.device)
        change = counts * frequency[:, None] + (counts > 0).float() * presence[:, None]
        logits.index_put_((index,), logits[index] - change)
    biased = [(i, p) for i, p in rows if p.bias_ids is not None]
    if biased:
        ids = [p.bias_ids for _, p in biased if p.bias_ids is not None]
        row_index = torch.cat([torch.full_like(t, i) for (i, _), t in zip(biased, ids, strict=True)])
        values = torch.cat([p.bias_values for _, p in biased if p.bias_values is not None])
        logits.index_put_((row_index, torch.cat(ids)), values, accumulate=True)
    if grammar_rows:
        banned = _banned(bitmask, logits.shape[-1]).to(logits.device, non_blocking=True)
        for k, (i, _) in enumerate(grammar_rows):  # in place, row by row: constrained rows are few
            logits[i].masked_fill_(banned[k], float("-inf"))
    return failed


def _masks(matchers: list[Any], vocab: int) -> torch.Tensor:
    """The matchers' next-token masks, one bit per token of the tokenizer's `vocab` ([rows, words] int32, on the
    host)."""
    import llguidance
    import llguidance.torch
    import torch

    global _executor
    bitmask = torch.empty((len(matchers), (vocab + 31) // 32), dtype=torch.int32)
    if len(matchers) == 1:
        llguidance.torch.fill_next_token_bitmask(matchers[0], bitmask, 0)
    else:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        llguidance.torch.fill_next_token_bitmask_par(_executor, [(m, k) for k, m in enumerate(matchers)], bitmask)
    return bitmask


def _banned(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The tokens a bitmask ([rows, words] int32 on the host, bit j of word w set when token 32w + j is allowed)
    does not allow, as booleans [rows, vocab], unpacked on the host by numpy (one pass, no thread pool); the model's
    logits may have more columns than its tokenizer has tokens: those are banned."""
    import numpy as np
    import torch

    words = bitmask.numpy().astype("<i4", copy=False)  # little-endian: byte b of a word holds its bits 8b to 8b+7
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
    banned = torch.from_numpy(bits[:, :vocab] == 0)
    if banned.shape[1] < vocab:
        banned = torch.nn.functional.pad(banned, (0, vocab - banned.shape[1]), value=True)
    return banned
