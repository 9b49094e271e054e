"""Response formatting: RequestOutputs become OpenAI's completion and chat bodies and SSE
chunks (text deltas, logprobs in the completions and chat shapes, echo with the prompt's
scores, vLLM's prompt_logprobs, usage). No I/O: the routes in server/generation.py feed it."""
from __future__ import annotations

import json
import time

from engine import RequestOutput


def _token_bytes(tokenizer, token_id: int, piece: str) -> list[int]:
    """The token's own UTF-8 bytes (a piece of a character decodes to U+FFFD, its bytes don't)."""
    if tokenizer is not None and "\ufffd" in piece:
        raw = tokenizer.token_bytes(token_id)
        if raw is not None:
            return list(raw)
    return list(piece.encode())


def sse_event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


# JSON has no -inf: a token a grammar masked (structured output) has log-probability -inf in
# a top-N list; it goes out as this, the floor vLLM's OpenAI server uses too.
MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class Formatter:
    """Turns RequestOutputs into OpenAI response bodies and stream chunks."""

    def __init__(self, rid: str, model: str, chat: bool, body, jobs, tokenizer):
        self.id, self.model, self.chat, self.body = rid, model, chat, body
        self.created = int(time.time())
        self.n = body.n
        self.prompts = [ids for ids, _ in jobs]
        self.tokenizer = tokenizer
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.finished: set[int] = set()
        self.completion_tokens: dict[int, int] = {}
        opts = body.stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.echo = not chat and body.echo
        self.score_only = self.echo and body.max_tokens == 0  # the one token is not shown
        self.echoed: set[int] = set()      # choices whose prompt part was streamed
        self.prompt_sent: set[int] = set()  # ... and whose prompt_logprobs field was
        self.prompt_chars: dict[int, int] = {}  # per prompt: its pieces' length (offsets)
        self.tools = body.tool_calls() if chat else None  # outputs are tool calls (tools.py)

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, choices) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": choices}

    def start_chunks(self):
        if self.chat:
            content = self.tools.first_content if self.tools else ""
            yield self._chunk([{"index": j, "delta": {"role": "assistant", "content": content},
                                "logprobs": None, "finish_reason": None}
                               for j in range(self.n)])

    def delta_chunks(self, i: int, out: RequestOutput):
        choices = []
        for c in out.outputs:
            index = i * self.n + c.index
            if index in self.finished:
                continue
            start_t, start_k = self.sent_text.get(index, 0), self.sent_tokens.get(index, 0)
            text, new_tokens = c.text[start_t:], len(c.token_ids) - start_k
            if self.score_only:
                text, new_tokens = "", 0
            self.completion_tokens[index] = 0 if self.score_only else len(c.token_ids)
            echo = self.echo and index not in self.echoed  # the prompt goes first, once
            if not text and not c.finish_reason and not (new_tokens and c.logprobs) \
                    and not echo:
                continue
            self.sent_text[index] = len(c.text)
            self.sent_tokens[index] = len(c.token_ids)
            logprobs = None
            if self.chat:
                logprobs = self._logprobs(c, start_k, start_t) if c.logprobs else None
            elif self.body.logprobs is not None:
                logprobs = self._cmpl_logprobs(i, out, c, start_k, start_t, echo, new_tokens > 0)
            if c.finish_reason:
                self.finished.add(index)
            if self.chat and self.tools:
                delta = self.tools.delta(index, c.text, bool(c.finish_reason))
                if delta or c.finish_reason or logprobs:
                    choices.append({"index": index, "delta": delta, "logprobs": logprobs,
                                    "finish_reason": self.tools.finish_reason(index,
                                                                              c.finish_reason)})
            elif self.chat:
                choices.append({"index": index, "delta": {"content": text} if text else {},
                                "logprobs": logprobs, "finish_reason": c.finish_reason})
            else:
                choice = {"index": index, "text": (self._prompt_text(i, out) if echo else "")
                          + text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                          "stop_reason": c.stop_reason}
                if echo:
                    self.echoed.add(index)
                if self.body.prompt_logprobs is not None and index not in self.prompt_sent:
                    self.prompt_sent.add(index)
                    choice["prompt_logprobs"] = self._vllm_prompt_logprobs(out)
                choices.append(choice)
        if choices:
            yield self._chunk(choices)

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def usage_chunk(self):
        if not self.include_usage:
            return None
        return {**self._chunk([]), "usage": self.usage()}

    def full(self, finals: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                index = i * self.n + c.index
                self.completion_tokens[index] = 0 if self.score_only else len(c.token_ids)
                if self.chat:
                    logprobs = self._logprobs(c, 0, 0) if c.logprobs else None
                    message, reason = {"role": "assistant", "content": c.text}, c.finish_reason
                    if self.tools:
                        message = self.tools.message(index, c.text)
                        reason = self.tools.finish_reason(index, reason)
                    choices.append({"index": index, "message": message, "logprobs": logprobs,
                                    "finish_reason": reason})
                    continue
                text = "" if self.score_only else c.text
                logprobs = None
                if self.body.logprobs is not None:
                    logprobs = self._cmpl_logprobs(i, out, c, 0, 0, self.echo,
                                                   not self.score_only)
                if self.echo:
                    text = self._prompt_text(i, out) + text
                choice = {"index": index, "text": text, "logprobs": logprobs,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if self.body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self._vllm_prompt_logprobs(out)
                choices.append(choice)
        body = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": sorted(choices, key=lambda c: c["index"]), "usage": self.usage()}
        if self.chat and self.body.prompt_logprobs is not None and finals:
            body["prompt_logprobs"] = self._vllm_prompt_logprobs(finals[0])
        return body

    # ---------------------------------------------------------------- the prompt's part

    def _prompt_text(self, i: int, out: RequestOutput) -> str:
        return out.prompt if out.prompt is not None else self._decode(self.prompts[i])

    @staticmethod
    def _empty_logprobs() -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    @staticmethod
    def _extend(into: dict, more: dict) -> None:
        for key, values in more.items():
            into[key].extend(values)

    def _cmpl_logprobs(self, i: int, out: RequestOutput, c, start_k: int, start_t: int,
                       with_prompt: bool, with_tokens: bool) -> dict:
        """Completions logprobs of one choice: prompt i's part first when with_prompt, then
        c's tokens from start_k, their offsets after the prompt's pieces when echoing."""
        logprobs, base = self._empty_logprobs(), self.prompt_chars.get(i, 0) if self.echo else 0
        if with_prompt:
            logprobs, base = self._prompt_part(i, out)
        if with_tokens:
            self._extend(logprobs, self._logprobs(c, start_k, base + start_t))
        return logprobs

    def _prompt_part(self, i: int, out: RequestOutput) -> tuple[dict, int]:
        """Completions logprobs of prompt i's tokens (the first: null, nothing predicts it)
        and where the completion's offsets go on: the pieces' total length."""
        ids, entries = self.prompts[i], out.prompt_logprobs or []
        first = self._decode(ids[:1])
        lp = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None],
              "text_offset": [0]}
        if len(entries) == len(ids):
            self._extend(lp, self._text_logprobs(ids[1:], entries[1:], self.body.logprobs or 0,
                                                 len(first)))
        end = lp["text_offset"][-1] + len(lp["tokens"][-1])
        self.prompt_chars[i] = end
        return lp, end

    def _vllm_prompt_logprobs(self, out: RequestOutput) -> list | None:
        """vLLM's prompt_logprobs field: per prompt token {token id: logprob, rank, decoded
        token}, the prompt's token and the top prompt_logprobs ones; the first is null."""
        if out.prompt_logprobs is None:
            return None
        k = self.body.prompt_logprobs or 0
        result = [None]
        for t, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
            result.append({str(tid): {"logprob": _finite(lp.logprob), "rank": lp.rank,
                                      "decoded_token": lp.decoded_token}
                           for tid, lp in entry.items()
                           if tid == t or (lp.rank is not None and lp.rank <= k)})
        return result

    def _chat_token(self, token_id: int, lp) -> dict:
        piece = lp.decoded_token or ""
        return {"token": piece, "logprob": _finite(lp.logprob),
                "bytes": _token_bytes(self.tokenizer, token_id, piece)}

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, False) if self.tokenizer else ""

    def _logprobs(self, c, start: int, text_offset: int):
        entries = c.logprobs[start:]
        tokens = c.token_ids[start:]
        if self.chat:
            content = []
            n = self.body.top_logprobs or 0
            for t, entry in zip(tokens, entries):
                chosen = entry[t]
                top = sorted(((tid, lp) for tid, lp in entry.items()
                              if lp.rank is not None and lp.rank <= n),
                             key=lambda item: item[1].rank)
                content.append({**self._chat_token(t, chosen),
                                "top_logprobs": [self._chat_token(tid, lp) for tid, lp in top]})
            return {"content": content}
        return self._text_logprobs(tokens, entries, self.body.logprobs or 0, text_offset)

    @staticmethod
    def _text_logprobs(tokens, entries, k: int, offset: int) -> dict:
        """The completions API's logprobs of these tokens, offsets from `offset` on."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, entry in zip(tokens, entries):
            chosen = entry[t]
            piece = chosen.decoded_token or ""
            out["tokens"].append(piece)
            out["token_logprobs"].append(_finite(chosen.logprob))
            top = {lp.decoded_token or "": _finite(lp.logprob) for lp in entry.values()
                   if lp.rank is not None and lp.rank <= k}
            out["top_logprobs"].append({piece: _finite(chosen.logprob), **top})
            out["text_offset"].append(offset)
            offset += len(piece)
        return out
