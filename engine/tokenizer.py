"""Tokenizers and chat templates, from GGUF metadata or an HF directory (via transformers)."""
from __future__ import annotations

import hashlib
import logging
import os

from engine.loader import ModelSource

logger = logging.getLogger(__name__)

CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "kvserve", "tokenizers")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), inverted."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    stand_in, extra = {b: b for b in kept}, 0
    for b in range(256):
        if b not in stand_in:
            stand_in[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in stand_in.items()}


_BYTE_LEVEL = _byte_level_alphabet()


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.eos_token_id = hf_tokenizer.eos_token_id
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf(text, add_special_tokens=add_special_tokens).input_ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The token's own bytes, read from its vocabulary entry where that is byte-level BPE
        (GPT-2's stand-in characters), else None. A token holding part of a UTF-8 character
        decodes to U+FFFD; its bytes are still these."""
        raw = self.hf.convert_ids_to_tokens(token_id)
        if isinstance(raw, str) and raw and all(ch in _BYTE_LEVEL for ch in raw):
            return bytes(_BYTE_LEVEL[ch] for ch in raw)
        return None

    def info(self, max_model_len: int) -> dict:
        """tokenizer_config.json's fields that a client needs to tokenize like the server
        (vLLM's /tokenizer_info): class, special tokens, chat template, length."""
        hf = self.hf
        added = {str(i): {"content": t.content, "special": t.special}
                 for i, t in hf.added_tokens_decoder.items()}
        return {"tokenizer_class": type(hf).__name__,
                **{f"{name}_token": getattr(hf, f"{name}_token", None)
                   for name in ("bos", "eos", "pad", "unk")},
                **{f"{name}_token_id": getattr(hf, f"{name}_token_id", None)
                   for name in ("bos", "eos", "pad", "unk")},
                "chat_template": hf.chat_template, "model_max_length": max_model_len,
                "vocab_size": self.vocab_size, "added_tokens_decoder": added,
                "clean_up_tokenization_spaces": bool(hf.clean_up_tokenization_spaces)}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """tools: OpenAI-style function definitions, for templates that render them (others
        ignore them)."""
        if not self.hf.chat_template:
            raise ValueError("this model has no chat template; use generate() with plain text")
        ids = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                          tokenize=True, tools=tools)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def load_tokenizer(source: ModelSource) -> Tokenizer | None:
    from transformers import AutoTokenizer
    if source.kind == "hf":
        has_files = any(os.path.isfile(os.path.join(source.path, f))
                        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        return Tokenizer(AutoTokenizer.from_pretrained(source.path)) if has_files else None
    # Converting a GGUF vocabulary takes seconds; keep the converted fast tokenizer on disk,
    # keyed by the file's identity, and load that next time.
    st = os.stat(source.path)
    key = hashlib.sha1(f"{os.path.abspath(source.path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    cached = os.path.join(CACHE_DIR, key.hexdigest()[:16])
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
        try:
            return Tokenizer(AutoTokenizer.from_pretrained(cached))
        except Exception as e:  # a damaged cache is rebuilt, never fatal
            logger.warning("tokenizer cache %s unreadable (%s); rebuilding", cached, e)
    hf = AutoTokenizer.from_pretrained(os.path.dirname(source.path),
                                       gguf_file=os.path.basename(source.path))
    try:
        hf.save_pretrained(cached)
    except OSError as e:
        logger.warning("cannot cache the tokenizer in %s: %s", cached, e)
    return Tokenizer(hf)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.prefix_offset = 0   # tokens before this are settled and out of the window
        self.read_offset = 0     # text of tokens before this has been emitted
        self.text = ""

    def step(self, token_ids: list[int]) -> str:
        decode = self.tokenizer.decode
        prefix = decode(token_ids[self.prefix_offset:self.read_offset], self.skip)
        full = decode(token_ids[self.prefix_offset:], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        self.text += delta
        return delta
