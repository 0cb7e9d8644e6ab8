"""Tiny random causal-LM folders of several architecture families, each with its own small tokenizer, built offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "gpt2", "gpt_neox", "phi")

# Fixed training text for the byte-level BPE tokenizers: enough repeated words to learn a few hundred merges.
_FRUITS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum")
_CORPUS_LINES: tuple[str, ...] = (
    "Name fruit number 1. apple",
    "Name fruit number 2. banana",
    "Name fruit number 3. cherry",
    "Name fruit number 4. grape",
    "Name fruit number 5. lemon",
    "Name fruit number 6. mango",
    "Name fruit number 7. peach",
    "Name fruit number 8. plum",
    "The apple is red, the banana is yellow, and the cherry is dark red.",
    "A grape is small; a lemon is sour! A mango is sweet? A peach is soft.",
    "The plum tree grows in the garden next to the peach tree and the apple tree.",
    "What is the name of the fruit? The fruit is a banana.",
    "Please name a fruit: mango, lemon, grape, cherry, plum, peach, apple or banana.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 2024 3.14 -7 +5 = 12%",
    "Count the fruits: one apple, two bananas, three cherries, four grapes, five lemons.",
    "Six mangos, seven peaches, eight plums, nine apples and ten bananas in the basket.",
    "Hello, how are you today? I am fine, thank you. Can you help me with a question?",
    "Sure! Here is the answer: the number of the fruit is 3 and its name is cherry.",
    "The user asks a question and the assistant gives a short, helpful answer.",
    "A system message tells the assistant how to behave: be brief, be kind, be correct.",
    "This is a test of the tokenizer. It should encode any text, even symbols like @ # $ & * ( ) [ ] { }.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the mat.",
    "We train a small model to learn that each number maps to one fruit name.",
    "Input: number 5. Output: lemon. Input: number 8. Output: plum. Input: number 1. Output: apple.",
    "Question: which fruit is number 6? Answer: mango. Question: which fruit is number 7? Answer: peach.",
    "Good morning, good evening, good night; see you later, see you soon.",
    'She said "yes" and he said "no" -- then they both laughed: ha ha!',
    "Lists, tables, and files: data.csv, model.json, train.jsonl, notes.txt, README.md",
    "In the morning we eat an apple, at noon a banana, and in the evening a bowl of cherries.",
    "Every fruit has a name and a number; the name is a word and the number is a digit.",
)
_CORPUS: tuple[str, ...] = _CORPUS_LINES + tuple(
    f"{name} {fruit} {number} {fruit}. {number}, {fruit}!"
    for number, fruit in enumerate(_FRUITS, start=1)
    for name in ("Name", "name", "Fruit", "fruit", "Number", "number")
)


@dataclass(frozen=True)
class _Family:
    """What differs per architecture family: tokenizer vocabulary, special tokens and chat template."""

    vocab_size: int
    special_tokens: tuple[str, ...]  # the first ones get the lowest ids, in this order
    eos_token: str
    bos_token: str | None
    pad_token: str | None
    chat_template: str


# Every template renders each message independently of the ones after it, and the generation prompt is exactly
# the opening of an assistant turn, so rendering is incremental (each shorter rendering is a prefix of the longer).
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_PHI_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
_GPT2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n\n' }}"
    "{% elif message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\n\n' }}"
    "{% else %}{{ 'User: ' + message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
_NEOX_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|prompter|>' }}{% else %}{{ '<|' + message['role'] + '|>' }}{% endif %}"
    "{{ message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_FAMILIES: dict[str, _Family] = {
    "llama": _Family(
        vocab_size=420,
        special_tokens=("<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"),
        eos_token="</s>",
        bos_token="<s>",
        pad_token="<pad>",
        chat_template=_LLAMA_TEMPLATE,
    ),
    "qwen2": _Family(
        vocab_size=520,
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos_token="<|im_end|>",
        bos_token=None,
        pad_token="<|endoftext|>",
        chat_template=_CHATML_TEMPLATE,
    ),
    "gpt2": _Family(
        vocab_size=480,
        special_tokens=("<|endoftext|>",),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token=None,
        chat_template=_GPT2_TEMPLATE,
    ),
    "gpt_neox": _Family(
        vocab_size=450,
        special_tokens=("<|endoftext|>", "<|padding|>", "<|system|>", "<|prompter|>", "<|assistant|>"),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|padding|>",
        chat_template=_NEOX_TEMPLATE,
    ),
    "phi": _Family(
        vocab_size=560,
        special_tokens=("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        eos_token="<|end|>",
        bos_token=None,
        pad_token="<|endoftext|>",
        chat_template=_PHI_TEMPLATE,
    ),
}

# Shared by every architecture: tiny enough to train in seconds on a CPU.
_HIDDEN = 64
_INTERMEDIATE = 128
_LAYERS = 2
_HEADS = 4
_MAX_POSITIONS = 512
# Wider than the usual 0.02 so that a 64-wide model can express confident predictions quickly.
_INIT_RANGE = 0.2


def _family(arch: str) -> _Family:
    if arch not in _FAMILIES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    return _FAMILIES[arch]


def chat_template_for(arch: str) -> str:
    """The Jinja chat template of `arch`'s family."""
    return _family(arch).chat_template


def write_chat_template(path: Path, arch: str) -> Path:
    """Write `arch`'s Jinja chat template to `path` (for `--chat-template FILE`); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(chat_template_for(arch), encoding="utf-8")
    return path


def build_tokenizer(arch: str, *, chat_template: bool = True) -> Any:
    """A `PreTrainedTokenizerFast` with a byte-level BPE trained on the fixed corpus, with `arch`'s special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    family = _family(arch)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=family.vocab_size,
        min_frequency=1,
        special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_CORPUS), trainer=trainer)
    named = {family.eos_token, family.bos_token, family.pad_token, "<unk>"}
    extra = [token for token in family.special_tokens if token not in named]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=family.eos_token,
        bos_token=family.bos_token,
        pad_token=family.pad_token,
        unk_token="<unk>" if "<unk>" in family.special_tokens else None,
        extra_special_tokens=extra,
        clean_up_tokenization_spaces=False,
        model_max_length=_MAX_POSITIONS,
    )
    tokenizer.chat_template = family.chat_template if chat_template else None
    return tokenizer


def _config(arch: str, vocab_size: int, ids: dict[str, Any], max_positions: int = _MAX_POSITIONS) -> Any:
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, PhiConfig, Qwen2Config

    if arch == "gpt2":  # GPT-2 names its sizes its own way
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=_HIDDEN,
            n_layer=_LAYERS,
            n_head=_HEADS,
            n_inner=_INTERMEDIATE,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            initializer_range=_INIT_RANGE,
            **ids,
        )
    sizes: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "max_position_embeddings": max_positions,
        "initializer_range": _INIT_RANGE,
        **ids,
    }
    if arch in ("llama", "qwen2"):  # grouped-query attention, tied embeddings
        return (LlamaConfig if arch == "llama" else Qwen2Config)(
            **sizes, num_key_value_heads=2, tie_word_embeddings=True
        )
    if arch in ("gpt_neox", "phi"):
        return (GPTNeoXConfig if arch == "gpt_neox" else PhiConfig)(**sizes)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


def _model_class(arch: str) -> Any:
    from transformers import (
        GPT2LMHeadModel,
        GPTNeoXForCausalLM,
        LlamaForCausalLM,
        PhiForCausalLM,
        Qwen2ForCausalLM,
    )

    return {
        "llama": LlamaForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "gpt2": GPT2LMHeadModel,
        "gpt_neox": GPTNeoXForCausalLM,
        "phi": PhiForCausalLM,
    }[arch]


def build_tiny_model(
    arch: str, dest: Path, *, chat_template: bool = True, seed: int = 0, max_positions: int = _MAX_POSITIONS
) -> Path:
    """Write a tiny random `arch` causal LM with its own tokenizer into `dest` (created); returns `dest`.

    The folder holds `config.json`, `model.safetensors`, `generation_config.json` and the tokenizer files, and
    loads with `AutoConfig` / `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(dest)`. Weights are seeded
    by `seed` without disturbing the global torch generator; `max_positions` is its context (prompts with tool
    definitions need more than the default: the tiny vocabulary spells them in many tokens).
    """
    import torch

    dest = Path(dest)
    tokenizer = build_tokenizer(arch, chat_template=chat_template)
    ids: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = _config(arch, len(tokenizer), ids, max_positions)
    tokenizer.model_max_length = max_positions
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = _model_class(arch)(config)
    finally:
        torch.random.set_rng_state(generator_state)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad_id
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest
