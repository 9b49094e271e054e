"""Benchmark prompts: random ones of a target token length, or a JSONL file.

Random prompts are built from random token ids with a tokenizer, decoded to text and
re-encoded (trimmed or topped up, a few rounds) so that the server sees about the target
number of tokens; every prompt is random from its first token, so prefix caching finds
nothing to share. Tokenizers, in the order the default tries them: the default model's
(engine.tokenizer, from the GGUF), the server's POST /tokenize + /detokenize, plain words.
"""
from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass
from typing import Protocol

WORD_LIST = ("the of and to in is was for on that with as by at from his her an were are which "
             "this be or has had not but one have first new their after who its they two been "
             "more other into time all when would there some can most only over city three year "
             "about world later river house music water light game under state small north "
             "early").split()
MAX_ADJUST_ROUNDS = 4


@dataclass(frozen=True)
class Prompt:
    """One benchmark request's input: `prompt` text, or chat `messages`."""
    prompt: str | None
    messages: list[dict] | None
    output_len: int
    input_len: int | None = None    # tokens the text encodes to with the bench's tokenizer


class TokenizerLike(Protocol):
    name: str

    def random_text(self, rng: random.Random, n: int) -> tuple[str, int]:
        """Random text of about n tokens: (text, its token count)."""
        ...


class _Adjusting:
    """random_text from random ids: decode, re-encode, trim or top up, a few rounds."""

    def random_text(self, rng: random.Random, n: int) -> tuple[str, int]:
        ids = self.random_ids(rng, n)[:n]
        text, count = "", 0
        for _ in range(MAX_ADJUST_ROUNDS):
            if len(ids) < n:
                ids += self.random_ids(rng, n - len(ids))
            text = self.decode(ids[:n])
            ids = self.encode(text)
            count = len(ids)
            if count == n:
                break
        return text, count


class LocalTokenizer(_Adjusting):
    """A tokenizer from a .gguf file or an HF directory (None: the default model), via engine."""

    def __init__(self, path: str | None = None):
        from engine.loader import resolve_model
        from engine.tokenizer import load_tokenizer
        source = resolve_model(path)
        tok = load_tokenizer(source)
        if tok is None:
            raise FileNotFoundError(f"{source.path} has no tokenizer files")
        self.hf, self.name = tok.hf, f"{source.name} (local)"
        special = set(tok.hf.all_special_ids)
        self.pool = [i for i in range(len(tok.hf)) if i not in special]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def random_ids(self, rng: random.Random, n: int) -> list[int]:
        return [self.pool[rng.randrange(len(self.pool))] for _ in range(n)]


@functools.lru_cache(maxsize=4)
def local_tokenizer(path: str | None) -> LocalTokenizer:
    """LocalTokenizer(path), loaded once per process (loading takes seconds)."""
    return LocalTokenizer(path)


class ServerTokenizer(_Adjusting):
    """The server's POST /tokenize and /detokenize (kvserve/vLLM and llama.cpp shapes).

    The vocabulary is unknown here, so random ids come from encoding random words."""

    def __init__(self, client, model: str):
        self.client, self.model, self.name = client, model, "the server's /tokenize"
        self.encode("probe")

    def encode(self, text: str) -> list[int]:
        # "content" is llama.cpp's name for the text; kvserve and vLLM ignore it
        r = self.client.post("/tokenize", json={"model": self.model, "prompt": text,
                                                "content": text, "add_special_tokens": False})
        r.raise_for_status()
        return list(r.json()["tokens"])

    def decode(self, ids: list[int]) -> str:
        r = self.client.post("/detokenize", json={"model": self.model, "tokens": ids})
        r.raise_for_status()
        body = r.json()
        return body["prompt"] if "prompt" in body else body["content"]

    def random_ids(self, rng: random.Random, n: int) -> list[int]:
        return self.encode(random_words(rng, n))


class WordTokenizer:
    """No tokenizer at all: one word counts as one token (prompt lengths are approximate)."""
    name = "none: random words, ~1 token each (approximate lengths)"

    def random_text(self, rng: random.Random, n: int) -> tuple[str, int]:
        return random_words(rng, n), n


def random_words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORD_LIST) for _ in range(n))


def sample_lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list[int]:
    """n integers uniform in [mean * (1 - r), mean * (1 + r)], at least 1."""
    lo = max(1, math.floor(mean * (1 - range_ratio)))
    hi = max(lo, math.ceil(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_dataset(tok: TokenizerLike, num_prompts: int, input_len: int, output_len: int,
                   range_ratio: float, seed: int) -> list[Prompt]:
    """num_prompts random prompts; lengths uniform in [len*(1-r), len*(1+r)]. Seeded, and
    the first k prompts are the same for any num_prompts >= k."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        n_in = sample_lengths(rng, 1, input_len, range_ratio)[0]
        n_out = sample_lengths(rng, 1, output_len, range_ratio)[0]
        text, count = tok.random_text(rng, n_in)
        prompts.append(Prompt(prompt=text, messages=None, output_len=n_out, input_len=count))
    return prompts


def load_jsonl(path: str, num_prompts: int, output_len: int) -> list[Prompt]:
    """The first num_prompts records (cycling when the file has fewer) of a JSONL file whose
    lines hold "prompt" (text) or "messages" (chat), optionally "output_len"/"max_tokens"."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            messages = obj.get("messages") if isinstance(obj, dict) else None
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            if not (isinstance(prompt, str) or isinstance(messages, list) and messages):
                raise ValueError(f"{path}:{lineno}: needs \"prompt\" (a string) or "
                                 f"\"messages\" (a non-empty list)")
            n_out = obj.get("output_len", obj.get("max_tokens", output_len))
            if not isinstance(n_out, int) or isinstance(n_out, bool) or n_out < 1:
                raise ValueError(f"{path}:{lineno}: output_len must be a positive integer")
            if isinstance(messages, list) and messages:
                records.append(Prompt(prompt=None, messages=messages, output_len=n_out))
            else:
                records.append(Prompt(prompt=prompt, messages=None, output_len=n_out))
    if not records:
        raise ValueError(f"{path} holds no prompts")
    return [records[i % len(records)] for i in range(num_prompts)]


def pick_tokenizer(spec: str | None, client, model: str,
                   warnings: list[str]) -> TokenizerLike:
    """`spec`: None (default model, else the server's, else words), "server", "words", or a
    .gguf/HF path. Fallbacks append a line to `warnings`."""
    if spec == "words":
        return WordTokenizer()
    if spec == "server":
        return ServerTokenizer(client, model)
    if spec is not None:
        return local_tokenizer(spec)
    try:
        return local_tokenizer(None)
    except Exception as e:  # noqa: BLE001 - engine, transformers or the GGUF missing
        first = f"the default model's tokenizer is unavailable ({type(e).__name__}: {e})"
    try:
        tok = ServerTokenizer(client, model)
        warnings.append(f"{first}; prompts are sized with the server's /tokenize")
        return tok
    except Exception as e:  # noqa: BLE001 - no /tokenize route, or another shape
        warnings.append(f"{first} and the server's /tokenize failed ({type(e).__name__}: "
                        f"{e}): prompts are random words, input lengths only approximate")
    return WordTokenizer()
