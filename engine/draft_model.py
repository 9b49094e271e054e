"""Draft-model proposals for speculative decoding (engine/spec_decode.py): a smaller model with
the target's vocabulary runs greedily ahead of each sequence.

The draft has its own ModelRunner and paged KV pool (as many blocks as the target's, each
smaller), and each target sequence a shadow Sequence holding the draft's block table. A step:
  1. every shadow takes the target's tokens; its computed count falls back to the longest
     prefix it shares with them (drafts the target refused are stale K/V past it), then the
     blocks past that go back and the sliding window evicts by it (never by a draft);
  2. one batched draft forward computes what each shadow lacks (its whole prompt the first
     time, else the last token and any accepted ones) and gives the first draft (argmax);
  3. k - 1 more one-token draft forwards, batched over the sequences still drafting.
Greedy drafts are deterministic, so the target's verification (draw from p, keep the draft iff
equal) stays lossless. A sequence whose draft KV does not fit the draft's pool gets no drafts
that step.
"""
from __future__ import annotations

import torch

from engine.block_manager import KVCacheManager
from engine.errors import ParamError
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


class DraftProposer:
    def __init__(self, path: str, target):  # target: the target engine's EngineConfig
        from engine.builder import build
        config, model, _, name = build(
            model=path, dtype=target.dtype, device=target.device.type,
            block_size=target.block_size, num_kv_blocks=target.num_kv_blocks,
            max_num_seqs=target.max_num_seqs,
            max_num_batched_tokens=target.max_num_batched_tokens,
            max_model_len=target.max_model_len, enable_prefix_caching=False,
            attention_backend=target.attention_backend, quantization=target.quantization,
            enforce_eager=target.enforce_eager, kv_cache_dtype=target.kv_cache_dtype,
            tp_rank=0)  # the draft runs whole on rank 0, even under tensor parallelism
        if config.model.vocab_size != target.model.vocab_size:
            raise ParamError("speculative_config", f"speculative_config: the draft model {name} "
                                                   f"has {config.model.vocab_size} tokens, the "
                                                   f"target {target.model.vocab_size}: they "
                                                   f"must share the tokenizer")
        self.name = name
        self.runner = ModelRunner(config, model)
        self.kv = KVCacheManager(config.num_kv_blocks, config.block_size,
                                 sliding_window=config.model.sliding_window)
        self.shadows: dict[int, Sequence] = {}  # target seq_id -> the draft's sequence
        self.synced: dict[int, int] = {}        # target seq_id -> its tokens the shadow has

    def propose(self, wants: list[tuple[Sequence, int]]) -> None:
        """Set seq.spec_token_ids to up to k greedy draft tokens for each (seq, k)."""
        active, counts = [], []
        for seq, k in wants:
            sh = self._sync(seq)
            n = sh.num_tokens - sh.num_computed_tokens
            if sh.num_tokens + k > self.runner.config.max_model_len or \
                    self.kv.max_new_tokens(sh) < n + k - 1:
                self._drop(seq.seq_id)
                continue
            self.kv.allocate(sh, n + k - 1)  # every position it will compute
            active.append((seq, sh, k))
            counts.append(n)
        step = 0
        while active:
            tokens = self._forward([sh for _, sh, _ in active], counts)
            step += 1
            still = []
            for (seq, sh, k), n, t in zip(active, counts, tokens):
                sh.num_computed_tokens += n
                sh.token_ids.append(t)
                seq.spec_token_ids.append(t)
                if step < k:
                    still.append((seq, sh, k))
            active, counts = still, [1] * len(still)

    def _sync(self, seq: Sequence) -> Sequence:
        sh = self.shadows.get(seq.seq_id)
        if sh is None:
            sh = self.shadows[seq.seq_id] = Sequence(seq.request_id, seq.index, [],
                                                     SamplingParams())
        # its first `synced` tokens are the target's (which only grow); after them come its
        # drafts, kept as far as they equal the target's new tokens
        synced = self.synced.get(seq.seq_id, 0)
        new = seq.token_ids[synced:]
        same = synced + next((i for i, (a, b) in enumerate(zip(sh.token_ids[synced:], new))
                              if a != b), min(len(sh.token_ids) - synced, len(new)))
        del sh.token_ids[synced:]
        sh.token_ids += new
        self.synced[seq.seq_id] = seq.num_tokens
        sh.num_computed_tokens = min(same, sh.num_computed_tokens, seq.num_tokens - 1)
        self.kv.trim(sh)
        self.kv.evict_out_of_window(sh)
        return sh

    @torch.inference_mode()
    def _forward(self, shadows: list[Sequence], counts: list[int]) -> list[int]:
        sampling, logits = self.runner.execute(shadows, counts)
        assert len(sampling) == len(shadows)
        return logits.argmax(dim=-1).tolist()

    def _drop(self, seq_id: int) -> None:
        self.synced.pop(seq_id, None)
        sh = self.shadows.pop(seq_id, None)
        if sh is not None:
            self.kv.free(sh)

    def forget(self, live: set[int]) -> None:
        """Free the shadows of sequences that are no longer running."""
        for sid in [s for s in self.shadows if s not in live]:
            self._drop(sid)
