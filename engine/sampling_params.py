"""Per-request sampling parameters (vLLM's names), validated where they are built."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import ParamError

# Bounds that keep the engine's arithmetic finite for any model length: logits divided by a
# repetition penalty near 0 overflow, and (5 + len) ** length_penalty over/underflows. The
# server's request models (server/protocol.py) publish the same numbers in /openapi.json.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_ABS_LENGTH_PENALTY = 10.0
MAX_PENALTY = 2.0       # presence and frequency penalties lie in [-2, 2] (OpenAI's bounds)
MAX_LOGPROBS = 20       # top entries per position, as OpenAI's top_logprobs
# Below this a temperature is greedy (vLLM's threshold too): logits / 1e-300 overflow to inf,
# and inf - inf = NaN in the sampler.
MIN_TEMPERATURE = 1e-5


@dataclass
class StructuredOutputsParams:
    """Constrain an output to a language (vLLM's names); exactly one of them. The engine
    compiles it once per distinct value (engine/structured_output.py)."""
    json: dict | str | None = None    # a JSON schema (object or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None   # one of these strings, exactly
    grammar: str | None = None        # EBNF / GBNF (root rule `root`)
    json_object: bool = False         # any JSON object
    # xgrammar's structural tag (object or JSON text): free text in which a trigger opens a
    # tag whose content follows its own format, e.g. a JSON schema (tool calls, "auto")
    structural_tag: dict | str | None = None

    def __post_init__(self):
        given = [k for k in ("json", "regex", "choice", "grammar", "structural_tag")
                 if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        _check(len(given) == 1, "structured_outputs",
               f"needs exactly one of json, regex, choice, grammar, json_object, "
               f"structural_tag; got {given or 'none'}")
        _check(self.choice is None or (isinstance(self.choice, list) and self.choice and all(
            isinstance(c, str) and c for c in self.choice)), "structured_outputs",
            "choice must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value), "structured_outputs",
                   f"{name} must be a non-empty string")
        _check(self.json is None or isinstance(self.json, (dict, str)), "structured_outputs",
               "json must be a JSON schema (an object or its text)")
        _check(self.structural_tag is None or isinstance(self.structural_tag, (dict, str)),
               "structured_outputs", "structural_tag must be an object or its JSON text")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar", "structural_tag",
                                 "json_object") if getattr(self, k) not in (None, False))


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    use_beam_search: bool = False
    beam_width: int = 1
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"must be >= 1, got {self.n}")
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature",
               f"must be a finite number >= 0, got {self.temperature}")
        _check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1), "top_k",
               f"must be -1 (disabled) or >= 1, got {self.top_k}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p",
               f"must be in (0, 1], got {self.top_p}")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p",
               f"must be in [0, 1], got {self.min_p}")
        _check(_finite(self.repetition_penalty)
               and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
               "repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY}, "
               f"{MAX_REPETITION_PENALTY}], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -MAX_PENALTY <= value <= MAX_PENALTY, name,
                   f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               f"must be >= 0, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check(all(isinstance(s, str) and s for s in self.stop_list), "stop",
               "stop strings must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be non-negative token ids")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                   name, f"must be between 0 and {MAX_LOGPROBS}, got {value}")
        _check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        _check(isinstance(self.beam_width, int) and self.beam_width >= 1, "beam_width",
               f"must be >= 1, got {self.beam_width}")
        _check(_finite(self.length_penalty) and abs(self.length_penalty) <= MAX_ABS_LENGTH_PENALTY,
               "length_penalty", f"must be a number in [-{MAX_ABS_LENGTH_PENALTY:g}, "
               f"{MAX_ABS_LENGTH_PENALTY:g}], got {self.length_penalty}")
        _check(not self.use_beam_search or self.n <= self.beam_width, "n",
               f"must be <= beam_width ({self.beam_width}) with beam search, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ParamError(name, f"{name} {message}")
