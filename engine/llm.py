"""Offline API: LLM(...).generate(prompts, params) and .chat(messages, params)."""
from __future__ import annotations

import itertools
from typing import Sequence as Seq

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 block_size: int = 16, num_kv_blocks: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, attention_backend: str = "auto",
                 load_format: str = "auto", quantization: str | None = None,
                 enforce_eager: bool = False, speculative_config: dict | str | None = None,
                 kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1, **kwargs):
        self.engine = LLMEngine.from_args(
            model=model, dtype=dtype, device=device, block_size=block_size,
            num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, attention_backend=attention_backend,
            load_format=load_format, quantization=quantization, enforce_eager=enforce_eager,
            speculative_config=speculative_config, kv_cache_dtype=kv_cache_dtype,
            tensor_parallel_size=tensor_parallel_size, **kwargs)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's other tensor-parallel ranks (worker processes)."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str] | Seq[list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [tok.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list, params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = str(next(self._ids))
                engine.add_request(rid, prompt, p)
                ids.append(rid)
            results: dict[str, RequestOutput] = {}
            bar = None
            if use_tqdm:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar:
                            bar.update(1)
            if bar:
                bar.close()
        except BaseException:
            for rid in ids:  # never leave half a batch holding KV blocks
                engine.abort_request(rid)
            raise
        return [results[rid] for rid in ids]
