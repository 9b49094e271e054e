"""One decoder covering Llama, Mistral (sliding window), Qwen2 (qkv bias), Qwen3 (q/k norm).

The model sees one flat batch: packed tokens of all sequences, their positions, and the
attention metadata that addresses the paged KV cache.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.models.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation, then scale in the model dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.window = window
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.all_reduce = False  # tensor parallel: o_proj sums this rank's heads only

    def forward(self, x, positions, rope, kv_cache, meta: AttentionMetadata):
        # x: [T, hidden]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)      # [T, Hq, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)   # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(positions, q, k)
        out = meta.attend(q, k, v, kv_cache, self.scale, self.window)
        out = self.o_proj(out.reshape(-1, self.q_size))
        if self.all_reduce:
            dist.all_reduce(out)
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.all_reduce = False  # tensor parallel: down_proj sums this rank's slice only

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        out = self.down_proj(F.silu(gate) * up)
        if self.all_reduce:
            dist.all_reduce(out)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, rope, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """shard (engine/tp.py): this rank's part under tensor parallelism; `config` is then the
    rank's own (its heads and MLP width), and ranks other than 0 have no embedding or vocab
    projection (rank 0 embeds the batch and computes the logits)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device: torch.device, shard=None):
        super().__init__()
        self.shard = shard
        if shard is not None:
            cfg = shard.local_config(cfg)
        self.config = cfg
        has_vocab = shard is None or shard.rank == 0
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if has_vocab else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, w) for w in cfg.layer_windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) \
            if has_vocab else None
        if cfg.tie_word_embeddings and has_vocab:
            self.lm_head.weight = self.embed_tokens.weight
        if shard is not None and shard.world > 1:
            for layer in self.layers:
                layer.self_attn.all_reduce = layer.mlp.all_reduce = True
        scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, scaling, device)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden states [T, hidden]
        return self.decoder(self.embed_tokens(input_ids), positions, kv_caches, meta)

    def decoder(self, x: torch.Tensor, positions: torch.Tensor, kv_caches,
                meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, hidden] embedded tokens -> hidden states after the final norm
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, positions, self.rope, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> [N, vocab] float32
        if not isinstance(self.lm_head, nn.Linear):  # a quantized head (engine.quant)
            return self.lm_head(hidden).float()
        # W @ h^T is ~30% faster than h @ W^T for a tall vocab matrix on CPU (oneDNN/MKL).
        return torch.mm(self.lm_head.weight, hidden.t()).t().float().contiguous()

    # ---------------------------------------------------------------- weights

    _STACKED = {  # HF name part -> (our fused parameter, shard index)
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in self._STACKED:
                fused, shard = self._STACKED[parts[-2]]
                target = ".".join(parts[:-2] + [fused, parts[-1]])
                self._shard(params[target], shard, parts[-2]).copy_(tensor)
                loaded.add(f"{target}#{shard}")
                continue
            if name not in params:
                raise ValueError(f"unexpected weight {name!r} for {self.config.architecture}")
            params[name].copy_(tensor)
            loaded.add(name)
        missing = {n for n in self._expected_keys() if n not in loaded}
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]} ...")

    def _shard(self, param: torch.Tensor, shard: int, part: str) -> torch.Tensor:
        attn = self.layers[0].self_attn
        if part in ("q_proj", "k_proj", "v_proj"):
            sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        else:
            sizes = [self.config.intermediate_size] * 2
        start = sum(sizes[:shard])
        return param.narrow(0, start, sizes[shard])

    def _expected_keys(self) -> list[str]:
        keys = []
        for name, _ in self.named_parameters():
            fused = next((f for f in ("qkv_proj", "gate_up_proj") if f".{f}." in name), None)
            if fused:
                n = 3 if fused == "qkv_proj" else 2
                keys += [f"{name}#{i}" for i in range(n)]
            else:
                keys.append(name)
        return keys
