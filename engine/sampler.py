"""Batched token selection: one call per engine step picks the next token of every sampling row.

Order of operations (vLLM v1's), applied to the whole batch as tensor ops:

  0. raw log-probs for the output: log_softmax of the logits as they came in, before anything
     below (vLLM's default "raw_logprobs"); the chosen token's, and top-N / rank where asked.
  1. min_tokens: while num_output_tokens < min_tokens, stop_token_ids and (unless ignore_eos)
     the EOS ids get -inf.
  2. penalties: repetition over prompt + output tokens (a positive logit is divided by it, a
     negative one multiplied), then `logit -= frequency * count + presence * (count > 0)` over
     output tokens. Greedy rows are penalised too.
  3. greedy rows (temperature 0 or top_k 1): argmax of the penalised logits. Done.
  4. temperature.
  5. min_p: keep the tokens with p >= min_p * p_max.
  6. top_k: keep the k most likely of those.
  7. top_p: over the survivors, renormalised, keep the most likely tokens until their mass
     reaches top_p; the token that crosses top_p is kept.
  8. draw one token from what is left.

How the draw is made, and why:
  * Inverse CDF: cumsum of the weights, then searchsorted of a uniform, in two levels (a block
    of 256 entries by the block sums, then an entry of the block) so the float64 cumsums stay
    short. The exponential race argmax(p / E) needs V random numbers per row: on a 2-core CPU
    ~60 ms for 64 x 49152, over a quarter of a SmolLM2 decode step. Neither needs a host sync.
  * top_p without sorting (a 49152-entry sort is ~1.8 ms a row on the CPU): draw from the
    min_p/top_k survivors; the draw is in the nucleus iff the mass strictly above it is below
    top_p. If it is not, no token at or below it is, so redraw among the tokens above it. Every
    round draws in proportion to p from a superset of the nucleus, so the accepted token follows
    the nucleus distribution exactly; a round accepts with probability >= top_p, and the most
    likely token always passes. (Checking for another round syncs with the host.)
  * Rows with a top_k draw among their topk() candidates (no pass over the vocabulary after it).
  * A row with a seed draws its uniforms from its own generator, seeded by (seed + seq.index,
    output position), two per round it takes part in, so its tokens depend neither on the rest
    of the batch nor on how many positions a step samples. Unseeded rows share the global RNG.
  * fp32 rows on the CPU take kernels/cpu.py's passes (one parallel pass per row for the
    weights, for top_p's mass above a draw, for the chosen token's log-sum-exp) instead of
    several torch ops each: an engine step runs torch on one thread (the kernels' pool holds
    the cores), and these were ~2 ms of a 16-stream step. Same weights up to float rounding.

(Over 300 lines: the steps above are one batched pass, kept in one file in their order.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.sequence import Sequence
from engine.stop_rules import StopRules
from kernels import cpu as cpu_kernels


@dataclass
class SamplerOutput:
    tokens: torch.Tensor                      # [N] int64, the chosen token of each row
    logprobs: torch.Tensor                    # [N] float32, its raw log-probability
    # Only when some row asked for logprobs; rows that did not ask hold -1 / -inf / 0.
    top_ids: torch.Tensor | None = None       # [N, K] int64, K = max(params.logprobs)
    top_logprobs: torch.Tensor | None = None  # [N, K] float32, raw, descending
    ranks: torch.Tensor | None = None         # [N] int64, 1-based rank of the chosen token


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    # logits: [N, V] -> raw log-probabilities [N, V] float32
    return torch.log_softmax(logits.float(), dim=-1)


class Sampler:
    def __init__(self, stop: StopRules | None = None):
        self.stop = stop or StopRules()  # what min_tokens keeps from ending an output

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 offsets: list[int] | None = None) -> SamplerOutput:
        # logits: [N, V], row i belongs to seqs[i]; offsets[i] = j: row i samples as if the
        # first j of seqs[i].spec_token_ids had been generated (speculative decoding's
        # verification rows; engine/spec_decode.py)
        logits = logits.float()
        b = _Batch.of(seqs, logits.shape[1], self.stop, logits.device,
                      offsets or [0] * len(seqs))
        if b.plain_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
            if b.greedy_rows:
                z = _rows(logits, b.greedy_rows, b, seqs, writable=False)
                tokens[_ids(b.greedy_rows, logits)] = z.argmax(dim=-1)
            if b.random_rows:
                tokens[_ids(b.random_rows, logits)] = _sample(logits, b, seqs)
        if not b.logprob_rows and _cpu(logits):  # the chosen token's only: x - log-sum-exp
            lse = cpu_kernels.row_stats(logits, tokens)[0]
            return SamplerOutput(tokens, logits.gather(1, tokens[:, None])[:, 0] - lse)
        logp = compute_logprobs(logits)                                         # [N, V]
        out = SamplerOutput(tokens, logp.gather(1, tokens[:, None])[:, 0])
        if b.logprob_rows:
            _add_top_logprobs(out, logp, b)
        return out


def _cpu(x: torch.Tensor) -> bool:
    """fp32 CPU tensors go through kernels/cpu.py's row kernels (one parallel pass each on
    the kernels' threads, where torch's ops in an engine step get one thread)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and cpu_kernels.available()


@dataclass
class _Batch:
    """Per-row parameters, gathered in one pass over the rows (never over the vocabulary)."""
    greedy_rows: list[int] = field(default_factory=list)
    random_rows: list[int] = field(default_factory=list)
    # of the random rows, in the same order
    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)        # vocab when off
    top_p: list[float] = field(default_factory=list)
    min_p: list[float] = field(default_factory=list)
    generators: list[torch.Generator | None] = field(default_factory=list)
    banned: dict[int, list[int]] = field(default_factory=dict)   # row -> token ids (min_tokens)
    offsets: list[int] = field(default_factory=list)   # drafts before each row (all rows)
    penalised: set[int] = field(default_factory=set)
    logprob_rows: list[int] = field(default_factory=list)
    num_logprobs: int = 0

    @property
    def plain_greedy(self) -> bool:
        return not (self.random_rows or self.banned or self.penalised or self.logprob_rows)

    @classmethod
    def of(cls, seqs: list[Sequence], vocab: int, stop: StopRules, device: torch.device,
           offsets: list[int]) -> "_Batch":
        b = cls(offsets=offsets)
        for row, (seq, off) in enumerate(zip(seqs, offsets)):
            p = seq.params
            num_out = seq.num_output_tokens + off
            if p.greedy:
                b.greedy_rows.append(row)
            else:
                b.random_rows.append(row)
                b.temperature.append(p.temperature)
                b.top_k.append(vocab if p.top_k == -1 else min(p.top_k, vocab))
                b.top_p.append(p.top_p)
                b.min_p.append(p.min_p)
                b.generators.append(None if p.seed is None else _generator(seq, num_out, off,
                                                                           device))
            # (a constrained row's grammar decides where it may end: masking EOS there too
            # could leave no token at all)
            if p.min_tokens and num_out < p.min_tokens and seq.grammar is None:
                if banned := sorted(t for t in stop.stop_tokens(p) if t < vocab):
                    b.banned[row] = banned
            if p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty:
                b.penalised.add(row)
            if p.logprobs is not None:
                b.logprob_rows.append(row)
                b.num_logprobs = max(b.num_logprobs, p.logprobs)
        return b


def _rows(logits: torch.Tensor, rows: list[int], b: _Batch, seqs: list[Sequence],
          writable: bool = True) -> torch.Tensor:
    """These rows of the logits with min_tokens and the penalties applied: [len(rows), V].
    A copy, unless nothing changes them and the caller only reads (then maybe the logits)."""
    banned = [(i, t) for i, row in enumerate(rows) for t in b.banned.get(row, ())]
    penalised = [i for i, row in enumerate(rows) if row in b.penalised]
    if not (writable or banned or penalised) and len(rows) == len(logits):
        return logits                                   # rows are 0..N-1 in order
    z = logits.index_select(0, _ids(rows, logits))
    if banned:
        z[_ids([i for i, _ in banned], z), _ids([t for _, t in banned], z)] = -math.inf
    if penalised:
        _apply_penalties(z, penalised, [seqs[rows[i]] for i in penalised],
                         [b.offsets[rows[i]] for i in penalised])
    return z


def _sample(logits: torch.Tensor, b: _Batch, seqs: list[Sequence]) -> torch.Tensor:
    # logits: [N, V] raw -> tokens [R] of the random rows, in b.random_rows order
    dev, vocab = logits.device, logits.shape[1]
    tokens = torch.empty(len(b.random_rows), dtype=torch.long, device=dev)
    # Rows with a top_k draw among their topk() candidates; the others among the whole vocabulary.
    for group in ([i for i, k in enumerate(b.top_k) if k < vocab],
                  [i for i, k in enumerate(b.top_k) if k >= vocab]):
        if not group:
            continue
        top_k = b.top_k[group[0]] < vocab
        z = _rows(logits, [b.random_rows[i] for i in group], b, seqs, writable=not top_k)
        ids = None                                                               # z: [G, V]
        if top_k:
            k = [b.top_k[i] for i in group]
            z, ids = z.topk(max(k), dim=-1)                                      # [G, kmax]
            k = torch.tensor(k, device=dev)
            z.masked_fill_(torch.arange(z.shape[1], device=dev) >= k[:, None], -math.inf)
        temperature = [b.temperature[i] for i in group]
        if any(t != 1 for t in temperature):
            z.div_(torch.tensor(temperature, device=dev)[:, None])
        pos = _draw_filtered(z, [b.min_p[i] for i in group], [b.top_p[i] for i in group],
                             [b.generators[i] for i in group])
        tokens[_ids(group, z)] = pos if ids is None else ids.gather(1, pos[:, None])[:, 0]
    return tokens


CUTOFF = -80.0  # log of the smallest weight p / p_max a draw can pick


def _draw_filtered(z: torch.Tensor, min_p: list[float], top_p: list[float],
                   generators: list[torch.Generator | None]) -> torch.Tensor:
    # z: [G, C] tempered logits of the candidates (-inf: not one), overwritten -> positions [G]
    if _cpu(z) and z.is_contiguous():  # the same weights in one pass (kernels/cpu.py)
        w = cpu_kernels.sample_weights_(z, min_p, CUTOFF)
    else:
        # a tiny temperature or penalty can overflow a logit to inf: keep it the largest finite
        z.nan_to_num_(nan=-math.inf, posinf=torch.finfo(z.dtype).max)
        z.sub_(z.amax(dim=-1, keepdim=True))
        # exp on x86 is ~5x slower on -inf and ~10x on what underflows to denormals than on
        # the rest (16 x 49152: 1.5 ms with most masked by a grammar, 4.4 at a low
        # temperature, 0.3 finite): every weight below e^-80 of the best is 0 instead, by two
        # threshold passes that keep exp's input finite (0.4 ms in all cases). The draws are
        # the same: such weights are below float64's resolution of the cumulative sums.
        w = F.threshold_(F.threshold_(z, CUTOFF, CUTOFF).exp_(), math.exp(CUTOFF) * 1.0001,
                         0.0)
        if any(min_p):
            w.masked_fill_(w < torch.tensor(min_p, device=w.device)[:, None], 0)
    pos, total = _draw(w, generators)
    rows = [i for i, p in enumerate(top_p) if p < 1]
    if rows:
        limit = torch.tensor(top_p, dtype=torch.float64, device=w.device) * total  # [G]
        w = w if len(rows) == len(w) else w.index_select(0, _ids(rows, w))
    while rows:
        # the mass strictly above the draw; at or past top_p, the draw is outside the nucleus
        r = _ids(rows, w)
        if _cpu(w) and w.is_contiguous():  # the mass alone; the weights above only to redraw
            outside = (cpu_kernels.mass_above(w, pos[r]) >= limit[r]).tolist()
            keep = torch.tensor(outside, device=w.device)
            w, at = w[keep], pos[r][keep]
            above = torch.where(w > w.gather(1, at[:, None]), w, 0)
        else:
            above = torch.where(w > w.gather(1, pos[r][:, None]), w, 0)          # [Gp, C]
            outside = (above.sum(dim=-1) >= limit[r]).tolist()
            above = above[torch.tensor(outside, device=w.device)]
        rows = [i for i, out in zip(rows, outside) if out]
        if rows:
            w = above                                            # redraw among the tokens above
            pos[_ids(rows, w)] = _draw(w, [generators[i] for i in rows])[0]
    return pos


DRAW_BLOCK = 256


def _draw(w: torch.Tensor, generators: list[torch.Generator | None]):
    """Inverse-CDF draw in two levels: a block of DRAW_BLOCK entries by the block sums, then an
    entry of that block. float64 cumsums of a few hundred entries keep small weights exact
    (a float32 cumsum over 49152 entries would not), and cost far less than one over all."""
    # w: [G, C] >= 0, some > 0 -> (positions [G] int64, total weight [G] float64)
    g, c = w.shape
    u = torch.rand(g, 2, device=w.device)
    for i, gen in enumerate(generators):
        if gen is not None:
            u[i] = torch.rand(2, generator=gen, device=w.device)
    pad = -c % DRAW_BLOCK
    blocks = (torch.nn.functional.pad(w, (0, pad)) if pad else w).reshape(g, -1, DRAW_BLOCK)
    block, total = _search(blocks.sum(dim=-1), u[:, 0])                          # [G]
    entry = _search(blocks[torch.arange(g, device=w.device), block], u[:, 1])[0]
    return block * DRAW_BLOCK + entry, total


def _search(w: torch.Tensor, u: torch.Tensor):
    # w: [G, C] >= 0, u: [G] in [0, 1) -> (first index whose cumulative weight passes u * total,
    # total [G] float64). u < 1 in float32, so u * total < total: never past the last weight,
    # and a zero weight (an empty interval) is never the first to pass.
    cdf = w.double().cumsum(dim=-1)
    total = cdf[:, -1]
    return torch.searchsorted(cdf, (u.double() * total)[:, None], right=True)[:, 0], total


class _SeenTokens:
    """The tokens one sequence has seen (prompt + output) and its output counts, for the
    penalties; kept across steps and topped up with the outputs not yet counted."""

    def __init__(self, seq: Sequence, device: torch.device):
        self.owner = id(seq)        # a copied Sequence must not share (and double-count) this
        self.device = device
        ids = list(dict.fromkeys(seq.token_ids[:seq.num_prompt_tokens]))
        self.slot = {t: i for i, t in enumerate(ids)}
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)     # [U]
        self.counts = torch.zeros(len(ids), device=device)                # [U] output counts
        self.num_counted = 0

    @classmethod
    def of(cls, seq: Sequence, device: torch.device) -> "_SeenTokens":
        st = seq.sampler_state
        if not (isinstance(st, cls) and st.owner == id(seq) and st.device == device
                and st.num_counted <= seq.num_output_tokens):
            st = seq.sampler_state = cls(seq, device)
        st.count(seq.token_ids[seq.num_prompt_tokens + st.num_counted:])
        return st

    def with_drafts(self, drafts: list[int]) -> "_SeenTokens":
        """A copy that also counts `drafts` as output (this one is left as it is)."""
        st = object.__new__(_SeenTokens)
        st.owner, st.device, st.num_counted = None, self.device, self.num_counted
        st.slot, st.ids, st.counts = dict(self.slot), self.ids, self.counts.clone()
        st.count(drafts)
        return st

    def count(self, tail: list[int]) -> None:
        if not tail:
            return
        new = [t for t in dict.fromkeys(tail) if t not in self.slot]
        if new:
            self.slot.update({t: len(self.slot) + i for i, t in enumerate(new)})
            self.ids = torch.cat([self.ids, torch.tensor(new, device=self.device)])
            self.counts = torch.cat([self.counts, torch.zeros(len(new), device=self.device)])
        slots = torch.tensor([self.slot[t] for t in tail], device=self.device)
        self.counts.index_add_(0, slots, torch.ones(len(tail), device=self.device))
        self.num_counted += len(tail)


def _apply_penalties(z: torch.Tensor, rows: list[int], seqs: list[Sequence],
                     offsets: list[int]) -> None:
    # z: [G, V], changed in place at the tokens that seqs[j] (row rows[j]) has seen, with the
    # first offsets[j] of its drafts counted as output
    dev = z.device
    seen = [_SeenTokens.of(seq, dev) for seq in seqs]
    states = [st if not off else st.with_drafts(seq.spec_token_ids[:off])
              for st, seq, off in zip(seen, seqs, offsets)]
    sizes = torch.tensor([len(st.ids) for st in states], device=dev)

    def per_token(values):  # one value per row -> one per seen (row, token)
        return torch.tensor(values, dtype=z.dtype, device=dev).repeat_interleave(sizes)

    r = torch.tensor(rows, device=dev).repeat_interleave(sizes)
    ids = torch.cat([st.ids for st in states])
    counts = torch.cat([st.counts for st in states])
    v = z[r, ids]
    rep = per_token([s.params.repetition_penalty for s in seqs])
    v = torch.where(v > 0, v / rep, v * rep)
    v -= per_token([s.params.frequency_penalty for s in seqs]) * counts
    v -= per_token([s.params.presence_penalty for s in seqs]) * (counts > 0)
    z[r, ids] = v


def _add_top_logprobs(out: SamplerOutput, logp: torch.Tensor, b: _Batch) -> None:
    # logp: [N, V] raw log-probs -> top_ids/top_logprobs [N, K], ranks [N] of the rows that asked
    n, k, dev = logp.shape[0], b.num_logprobs, logp.device
    rows = _ids(b.logprob_rows, logp)
    lp = logp.index_select(0, rows)                                              # [L, V]
    chosen = lp.gather(1, out.tokens[rows, None])                                # [L, 1]
    out.ranks = torch.zeros(n, dtype=torch.long, device=dev)
    out.ranks[rows] = (lp >= chosen).sum(dim=-1)
    values, ids = lp.topk(k, dim=-1)
    out.top_ids = torch.full((n, k), -1, dtype=torch.long, device=dev)
    out.top_logprobs = torch.full((n, k), -math.inf, device=dev)
    out.top_ids[rows], out.top_logprobs[rows] = ids, values


def _ids(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=like.device)


def _generator(seq: Sequence, position: int, offset: int,
               device: torch.device) -> torch.Generator:
    # A seeded row's draws depend only on its seed, its index among the request's outputs and
    # the output position it samples: not on the batch, nor on how many tokens a step makes
    # (speculative decoding verifies several positions of a sequence in one step, a generator
    # each: offset is the row's among them).
    while len(seq.generators) <= offset:
        seq.generators.append(torch.Generator(device))
    return seq.generators[offset].manual_seed(hash((seq.params.seed + seq.index, position))
                                              % 2**64)
