"""Batched token selection: one call per step for every sequence that samples."""
from __future__ import annotations

import torch

from engine.sequence import Sequence


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        # logits: [N, V] float32 -> (token ids [N], their log-probabilities [N])
        greedy = logits.argmax(dim=-1)
        temps = [s.params.temperature if not s.params.greedy else 0.0 for s in seqs]
        if not any(temps):
            tokens = greedy
        else:
            t = torch.tensor(temps, device=logits.device, dtype=logits.dtype)
            probs = torch.softmax(logits / torch.where(t > 0, t, 1.0)[:, None], dim=-1)
            # argmax(p / E) with E ~ Exp(1) draws from p (no host sync, no cumsum).
            noise = torch.empty_like(probs).exponential_()
            for row, seq in enumerate(seqs):
                if seq.params.seed is not None and temps[row]:
                    noise[row].exponential_(generator=self._generator(seq, logits.device))
            tokens = torch.where(t > 0, (probs / noise).argmax(dim=-1), greedy)
        # log p(token) without materialising the whole log-softmax
        return tokens, logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)

    @staticmethod
    def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
        # One generator per sequence: its draws depend only on its seed and its own steps.
        if seq.generator is None:
            seq.generator = torch.Generator(device).manual_seed(seq.params.seed + seq.index)
        return seq.generator
