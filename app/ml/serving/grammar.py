"""Grammars for constrained decoding (structured outputs and tool calls), with llguidance: a JSON schema, any JSON
object, or a grammar in llguidance's Lark dialect, compiled once per tokenizer and grammar (a bounded cache); each
row that uses one takes a matcher of its own, which says which tokens may come next and advances with each token
the row samples (app/ml/serving/logits.py).

llguidance over xgrammar (BENCHMARKS.md, "Structured outputs"): on SmolLM2's 49k vocabulary a typical schema
compiles in milliseconds (xgrammar: close to a second), so a new schema does not stall its request; a mask costs
about a tenth of a millisecond a token; and it needs no other package.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

# JSON as the grammar writes it: no whitespace between tokens (whitespace would let a model pad forever), `,`
# and `:` as separators; a keyword the compiler does not implement is an error, not ignored.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":", "lenient": False}
# Any JSON object (`response_format: {"type": "json_object"}`).
ANY_OBJECT: dict[str, Any] = {"type": "object"}
MAX_GRAMMARS = 256  # compiled grammars kept (each a few kilobytes until used, its lexer's states as rows use it)
MAX_TOKENIZERS = 8  # tokenizers prepared for llguidance (each about a second to build, a few MB)
MAX_ERROR_CHARS = 300


class GrammarError(ValueError):
    """A grammar that cannot be compiled (a schema using what the compiler does not support, say): the message
    says what, in words fit for the user who sent it."""


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar for one tokenizer. `matcher()` gives a row its own state; the template never advances."""

    name: str  # what it constrains to, for messages: "a JSON object", "the JSON schema 'person'"
    template: Any  # llguidance.LLMatcher at its start
    vocab: int  # its tokenizer's tokens (a mask has a bit for each)

    def matcher(self) -> Any:
        return self.template.deep_copy()


class Grammars:
    """Compiled grammars, by tokenizer and schema, least recently used dropped past `max_grammars`. Thread-safe:
    the API's threads compile, the engine thread only copies matchers."""

    def __init__(self, max_grammars: int = MAX_GRAMMARS, max_tokenizers: int = MAX_TOKENIZERS) -> None:
        self.max_grammars = max_grammars
        self.max_tokenizers = max_tokenizers
        self._grammars: OrderedDict[tuple[Hashable, str], Grammar] = OrderedDict()
        self._tokenizers: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses)

    def json(self, tokenizer: Any, *, tokenizer_key: Hashable, schema: dict[str, Any] | None, name: str) -> Grammar:
        """The grammar of JSON matching `schema` (None: any JSON object) for this tokenizer (`tokenizer_key` names
        it: the same key, the same tokenizer). Raises GrammarError for a schema it cannot compile."""
        import llguidance

        schema = ANY_OBJECT if schema is None else schema
        text = json.dumps(schema, separators=(",", ":"))  # in its order: properties are generated in it
        return self._compile(
            tokenizer,
            tokenizer_key,
            "json:" + text,
            name,
            lambda: llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS),  # type: ignore[arg-type]
        )

    def lark(self, tokenizer: Any, *, tokenizer_key: Hashable, grammar: str, name: str) -> Grammar:
        """The grammar written in llguidance's Lark dialect (tool calls: app/ml/tool_calls.py), for this tokenizer.
        Raises GrammarError for one it cannot compile (a JSON schema inside it that it does not support, say)."""
        import llguidance

        return self._compile(
            tokenizer, tokenizer_key, "lark:" + grammar, name, lambda: llguidance.LLMatcher.grammar_from_lark(grammar)
        )

    def _compile(self, tokenizer: Any, tokenizer_key: Hashable, text: str, name: str, build: Any) -> Grammar:
        import llguidance

        key = (tokenizer_key, hashlib.sha256(text.encode()).hexdigest())
        with self._lock:
            cached = self._grammars.get(key)
            if cached is not None:
                self._grammars.move_to_end(key)
                return cached
        lltokenizer = self._lltokenizer(tokenizer, tokenizer_key)
        try:
            grammar = build()
        except ValueError as exc:
            raise GrammarError(_clip(str(exc))) from None
        matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(_clip(matcher.get_error()))
        compiled = Grammar(name=name, template=matcher, vocab=lltokenizer.vocab_size)
        with self._lock:
            self.compiled += 1
            self._grammars[key] = compiled
            while len(self._grammars) > self.max_grammars:
                self._grammars.popitem(last=False)
        return compiled

    def _lltokenizer(self, tokenizer: Any, key: Hashable) -> Any:
        import llguidance.hf

        with self._lock:
            cached = self._tokenizers.get(key)
            if cached is not None:
                self._tokenizers.move_to_end(key)
                return cached
        try:
            built = llguidance.hf.from_tokenizer(tokenizer)
        except (ValueError, TypeError, AttributeError) as exc:  # not a fast (Rust) tokenizer
            raise GrammarError(
                f"the model's tokenizer cannot be used to constrain output ({type(exc).__name__})"
            ) from None
        with self._lock:
            self._tokenizers[key] = built
            while len(self._tokenizers) > self.max_tokenizers:
                self._tokenizers.popitem(last=False)
        return built


def _clip(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 1] + "…"


GRAMMARS = Grammars()  # the process's cache
