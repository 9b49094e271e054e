"""Owns the model and the KV cache; turns a scheduled step into one flat forward + sample."""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from engine import tp
from engine.attention import AttentionMetadata
from engine.config import EngineConfig
from engine.models import CausalLM
from engine.sequence import Sequence
from kernels import cpu as cpu_kernels
from kernels import kvquant

logger = logging.getLogger("kvserve.engine")

# Steps with at most this many tokens run the fused decoder forward (kernels/cpu.py); longer
# ones run torch's GEMMs. Measured on a 2-core EPYC (SmolLM2, one prompt chunk, fused vs
# torch): with the model's bf16 weights 131 vs 180 ms at 128 tokens, 261 vs 325 at 256, 1.31
# vs 1.27 s at 1024 (torch's bf16 GEMMs catch up), so up to 512. With packed weights (int8 /
# int4 with VNNI, or float32 tiles) the fused step wins at every size: int4 135 vs 232 ms at
# 256, 0.72 vs 1.09 s at 1024, 2.19 vs 2.71 s at 2048; float32 0.32 vs 0.58 s at 256, 1.57 vs
# 2.67 s at 1024 (the tiled attention keeps long chunks cheap), so it takes them all.
FAST_MAX_TOKENS = 512
FAST_MAX_TOKENS_PACKED = 1 << 30
PROMPT_LOGPROBS_ROWS = 256  # prompt positions scored at once (256 x 49k vocab: 50 MB)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: CausalLM):
        self.config = config
        self.model = model
        self.device = config.device
        m = model.config  # this rank's heads under tensor parallelism
        self.tp = model.shard is not None and model.shard.world > 1
        # One allocation: [layers, 2, num_blocks, block_size, Hkv, D]; zeros so that
        # padding and the null block are always finite. A quantized cache (kv_cache_dtype)
        # holds codes, its scales lie beside it (kernels/kvquant.py): int8's per slot in the
        # same paged layout, fp8's per KV head; each layer's entry is then (k, v, k_scale,
        # v_scale).
        self.kv_cache = torch.zeros(m.num_layers, 2, config.num_kv_blocks, config.block_size,
                                    m.num_kv_heads, m.head_dim, dtype=config.kv_dtype,
                                    device=self.device)
        self.kv_scales = kvquant.new_scales(config.kv_cache_dtype, m.num_layers,
                                            config.num_kv_blocks, config.block_size,
                                            m.num_kv_heads, self.device)
        if self.kv_scales is None:
            self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_cache]
        else:
            self.kv_caches = [(layer[0], layer[1], s[0], s[1])
                              for layer, s in zip(self.kv_cache, self.kv_scales)]
        self.fast = None
        weights = config.quantization if config.quantization in cpu_kernels.WEIGHT_FORMATS \
            else None
        if (not config.enforce_eager and self.device.type == "cpu" and not self.tp
                and cpu_kernels.Forward.supported(model, weights) and cpu_kernels.available()):
            self.fast = cpu_kernels.Forward(model, self.kv_caches, config.block_size, weights)
        elif weights:
            raise ValueError(f"quantization={weights!r} needs the fused CPU step, which this "
                             f"model cannot use (float32/bfloat16 weights, dimensions divisible "
                             f"by 32)")
        packed = self.fast is not None and self.fast.formats <= set(
            cpu_kernels.FORMAT_NAMES.values())
        self.fast_max = FAST_MAX_TOKENS_PACKED if packed else FAST_MAX_TOKENS
        fmt = ""
        if self.fast is not None:
            fmt = (f" ({'/'.join(sorted(self.fast.formats))} layers, {self.fast.head_format} head"
                   + (", x int8 activations" + ("" if cpu_kernels.has_vnni() else
                                                " (no VNNI: slow)") if weights else "") + ")")
        logger.info("step: %s; attention: %s",
                    ("fused CPU forward for every step" if packed else
                     f"fused CPU forward for steps of <= {self.fast_max} tokens, torch beyond")
                    + fmt
                    if self.fast else "eager torch" + (" (--enforce-eager)"
                                                       if config.enforce_eager else ""),
                    config.attention_backend)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of the flat batch: the fused forward for few tokens,
        the torch model otherwise."""
        if self.fast is not None and input_ids.shape[0] <= self.fast_max:
            return self.fast(self.model.embed_tokens(input_ids), positions, meta.slot_mapping,
                             meta.block_tables, meta.cu_seqlens_q, meta.seq_lens)
        with cpu_kernels.torch_on_all_threads():  # (steps hold torch to one thread: threads())
            return self.model(input_ids, positions, self.kv_caches, meta)

    def copy_blocks(self, copies) -> None:
        """Copy-on-write: blocks src -> dst in every layer (K, V and int8's scales)."""
        if not copies:
            return
        src, dst = (torch.tensor(x, device=self.device) for x in zip(*copies))
        kvquant.as_bytes(self.kv_cache)[:, :, dst] = kvquant.as_bytes(self.kv_cache)[:, :, src]
        if self.config.kv_cache_dtype == "int8":
            self.kv_scales[:, :, dst] = self.kv_scales[:, :, src]

    @torch.inference_mode()
    def execute(self, seqs: list[Sequence], num_tokens: list[int],
                copies: list[tuple[int, int]] = ()) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run one step: copy-on-write block copies, then one forward over the flat batch.
        Returns the sequences that reached their last token and their logits [N, V]; a
        sequence with k drafts (seq.spec_token_ids) has k + 1 consecutive rows, the logits
        after its last token and after each draft."""
        self.copy_blocks(copies)
        input_ids, positions, meta, sample_rows = self.prepare(seqs, num_tokens)
        if self.tp:  # every rank runs its layers on the batch rank 0 embedded
            x = self.model.embed_tokens(input_ids)
            tp.send_step(x, positions, meta, copies)
            hidden = self.model.decoder(x, positions, self.kv_caches, meta)
        else:
            hidden = self.forward(input_ids, positions, meta)
        if any(s.prompt_logprobs is not None for s in seqs):
            self._prompt_logprobs(seqs, num_tokens, hidden)
        sampling = [seqs[i] for i in sample_rows.tolist()]
        if not sampling:
            return [], None
        last = meta.cu_seqlens_q[1:].long() - 1
        rows = last[torch.from_numpy(sample_rows).to(self.device)]
        drafts = [len(s.spec_token_ids) for s in sampling]
        if any(drafts):  # a sequence with k drafts samples at its last k + 1 positions
            k = torch.tensor(drafts, device=self.device)
            ends = rows.repeat_interleave(k + 1)
            starts = torch.cumsum(k + 1, 0).repeat_interleave(k + 1)
            rows = ends - (starts - 1 - torch.arange(len(ends), device=self.device))
        return sampling, self.logits(hidden[rows])

    def threads(self):
        """The context an engine step runs in: torch on one thread while the fused CPU
        forward's pool holds the cores (kernels.cpu.torch_on_one_thread says why)."""
        return cpu_kernels.torch_on_one_thread() if self.fast is not None \
            else contextlib.nullcontext()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 [N, vocab]; few rows go through the CPU kernel, which reads
        the vocab matrix at ~3x the bandwidth of torch's bf16 GEMV here (bench/step.py)."""
        if self.fast is not None and hidden.shape[0] <= self.fast_max:
            return self.fast.logits(hidden)
        with cpu_kernels.torch_on_all_threads():
            return self.model.compute_logits(hidden)

    def _prompt_logprobs(self, seqs: list[Sequence], num_tokens: list[int],
                         hidden: torch.Tensor) -> None:
        """Teacher-forced scores of the prompt tokens this step's chunks predict, appended
        to seq.prompt_logprobs as (token, logprob, rank, top ids, top logprobs)."""
        offset = 0
        for seq, n in zip(seqs, num_tokens):
            start, scored = seq.num_computed_tokens, seq.prompt_logprobs
            if scored is None:  # a request beside the scored ones
                offset += n
                continue
            lo = max(start, len(scored) - 1)  # position p predicts prompt token p + 1
            hi = min(start + n, seq.num_prompt_tokens - 1)
            # PROMPT_LOGPROBS_ROWS positions at a time, on the sampler's head (the fused
            # kernel's where it runs): a prompt token's logprob is what the same position
            # would give a sampled one. No [rows, vocab] log-softmax is written.
            for a in range(lo, hi, PROMPT_LOGPROBS_ROWS):
                b = min(hi, a + PROMPT_LOGPROBS_ROWS)
                logits = self.logits(hidden[offset + a - start:offset + b - start]).float()
                target = torch.tensor(seq.token_ids[a + 1:b + 1], device=logits.device)
                chosen = logits.gather(1, target[:, None])
                if self.fast is not None:  # the CPU kernels: one parallel pass per row
                    lse, ranks = cpu_kernels.row_stats(logits, target)
                    lse = lse[:, None]
                else:
                    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                    ranks = (logits > chosen).sum(-1) + 1
                k = seq.params.prompt_logprobs
                top_logits, top_ids = logits.topk(k, dim=-1)  # k = 0: empty
                scored.extend(zip(target.tolist(), (chosen - lse)[:, 0].tolist(),
                                  ranks.tolist(), top_ids.tolist(),
                                  (top_logits - lse).tolist()))
            offset += n

    def prepare(self, seqs: list[Sequence], num_tokens: list[int]):
        """The flat batch of a step: input ids [T], positions [T], the attention metadata
        (slot mapping, block tables, cu_seqlens, seq lens) and the indices of the sequences
        whose last token is in it (those sample). Reads the sequences' block tables only."""
        bs = self.config.block_size
        n_new = np.asarray(num_tokens, dtype=np.int64)                   # [S]
        start = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, len(seqs))
        seq_lens = start + n_new
        cu = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(n_new, out=cu[1:])
        total = int(cu[-1])
        row = np.repeat(np.arange(len(seqs)), n_new)                     # [T] seq of each token
        positions = start[row] + np.arange(total) - cu[:-1][row]          # [T]
        width = max(len(s.block_ids) for s in seqs)
        tables = np.zeros((len(seqs), width), dtype=np.int32)
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_ids)] = s.block_ids
        slots = tables[row, positions // bs].astype(np.int64) * bs + positions % bs
        ids = [t for s, a, n in zip(seqs, start.tolist(), num_tokens)
               for t in (s.token_ids[a:a + n] if not s.spec_token_ids
                         else (s.token_ids[a:] + s.spec_token_ids)[:n])]
        ends = np.fromiter((s.num_tokens + len(s.spec_token_ids) for s in seqs), np.int64,
                           len(seqs))
        sample_rows = np.nonzero(seq_lens == ends)[0]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            block_tables=torch.from_numpy(tables).to(dev),
            cu_seqlens_q=torch.from_numpy(cu.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            backend=self.config.attention_backend,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        return input_ids, torch.from_numpy(positions).to(dev), meta, sample_rows
