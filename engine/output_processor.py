"""After the sampler: append tokens, detokenize, stop (EOS, stop ids, stop strings, lengths),
and build what users read: a request's RequestOutput (text held back while it could still
become a stop string, logprobs in vLLM's shape, beam search's best hypotheses)."""
from __future__ import annotations

from engine.outputs import CompletionOutput, FinishReason, Logprob, RequestOutput
from engine.sequence import Sequence
from engine.stop_rules import StopRules
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, stop: StopRules):
        self.tokenizer = tokenizer
        self.stop = stop

    def append(self, seq: Sequence, token: int, logprob: float,
               top: tuple[int, list[int], list[float]] | None = None) -> FinishReason | None:
        """Add one sampled token to seq; returns the finish reason if seq is done.
        `top` = (rank of token, top ids, their logprobs) when the request asked for logprobs."""
        if not self.append_token(seq, token, logprob, top):
            return FinishReason.ABORT  # its grammar had no way on (StructuredOutputs.apply)
        p = seq.params
        if seq.grammar is not None and seq.grammar.is_terminated():
            return FinishReason.STOP  # the grammar took its end (EOS, even with ignore_eos)
        new_text = 0
        if self.tokenizer is not None:
            if seq.detok is None:
                seq.detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens)
            new_text = len(seq.detok.step(seq.output_token_ids))
        if self.stop.may_stop(p, seq.num_output_tokens):
            if self.stop.is_stop_token(p, token):
                if token in p.stop_token_ids:
                    seq.stop_reason = token
                return FinishReason.STOP
            if p.stop_list and new_text and self._stop_string(seq, new_text):
                return FinishReason.STOP
        return self.stop.length_reason(seq)

    def append_token(self, seq: Sequence, token: int, logprob: float,
                     top: tuple[int, list[int], list[float]] | None = None) -> bool:
        """Only the token, its log-probability and its logprobs entry (beam search); False
        if the sequence's grammar refused the token."""
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            seq.logprobs.append(self.entry(token, logprob, top))
        return seq.grammar is None or seq.grammar.accept_token(token)

    def entry(self, token: int, logprob: float,
              top: tuple[int, list[int], list[float]] | None) -> dict[int, Logprob]:
        """{token: Logprob} for the chosen token, then the top-N (vLLM's shape)."""
        entry = {token: Logprob(logprob, top[0] if top else None, self._piece(token))}
        if top:
            for rank, (t, lp) in enumerate(zip(top[1], top[2]), 1):
                entry.setdefault(t, Logprob(lp, rank, self._piece(t)))
        return entry

    def prompt_logprobs(self, raw: list) -> list[dict[int, Logprob] | None]:
        """The runner's (token, logprob, rank, top ids, top logprobs) rows, formatted."""
        return [None] + [self.entry(t, lp, (rank, ids, lps)) for t, lp, rank, ids, lps in raw[1:]]

    def _stop_string(self, seq: Sequence, new_chars: int) -> bool:
        """Find the earliest stop string that the new text completes; cut the text there."""
        text = seq.detok.text
        best = None
        for s in seq.params.stop_list:
            i = text.find(s, max(0, len(text) - new_chars - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        seq.stop_text_end, seq.stop_reason = best
        return True

    def _piece(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token], False)

    @staticmethod
    def visible_text(seq: Sequence) -> str:
        """The text a user may see now: cut at a matched stop string, and while running,
        without a tail that could still grow into a stop string."""
        if seq.detok is None:
            return ""
        text = seq.detok.text
        if seq.stop_text_end is not None:
            return text[:seq.stop_text_end]
        if seq.is_finished or not seq.params.stop_list:
            return text
        hold = 0
        for s in seq.params.stop_list:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[:len(text) - hold]

    def text(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens) if self.tokenizer else ""

    def completion(self, seq: Sequence) -> CompletionOutput:
        return CompletionOutput(
            index=seq.index,
            text=self.visible_text(seq),
            token_ids=seq.output_token_ids,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=seq.logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    def request_output(self, req) -> RequestOutput:
        """What a request (engine.request.Request) has produced so far."""
        raw = req.prompt_logprobs
        if raw is not None and req.formatted_prompt_logprobs is None \
                and len(raw) == len(req.prompt_token_ids):
            req.formatted_prompt_logprobs = self.prompt_logprobs(raw)
        if req.beam is not None:  # reported once, when the search ends or is aborted
            outputs, finished = self._beam_completions(req.beam), True
        else:
            outputs, finished = [self.completion(seq) for seq in req.seqs], req.finished
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs,
                             finished=finished, prompt_logprobs=req.formatted_prompt_logprobs,
                             first_scheduled_time=req.first.first_scheduled_time)

    def _beam_completions(self, st) -> list[CompletionOutput]:
        """The best n hypotheses of a beam search (all "abort" when it was cut short)."""
        skip = st.params.skip_special_tokens
        return [CompletionOutput(i, self.text(h.token_ids, skip), h.token_ids,
                                 h.cumulative_logprob, h.logprobs,
                                 h.finish_reason if st.done else FinishReason.ABORT)
                for i, h in enumerate(st.best(st.params.n))]
