"""The Python API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

from sparsespec_jax.engine import Engine, EngineConfig, RequestError
from sparsespec_jax.loading import DEFAULT_MODEL, load_model
from sparsespec_jax.request import Request, RequestOutput
from sparsespec_jax.sampling import SamplingParams
from sparsespec_jax.sharding import check_tensor_parallel
from sparsespec_jax.spec.config import SpecConfig


class LLM:
    """A loaded model plus an engine. Keyword arguments mirror EngineConfig's fields; `spec` picks the draft
    method (PillarAttn self-speculation by default, SpecConfig(method="none") for vanilla decoding)."""

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, dtype: str = "float32",
                 max_batch_size: int = 16, kv_cache_tokens: int = 16384, page_size: int = 16,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None,
                 prefill_chunk_size: int = 128, attention_backend: str = "auto", seed: int = 0,
                 spec: SpecConfig | None = None, scheduler: str = "unified", sync_host: bool = False,
                 host_kv_tokens: int = 65536, tensor_parallel: int = 1, unroll_layers: bool = False,
                 burst_steps: int | None = None):
        spec = spec or SpecConfig()
        # Room for every slot to verify in the same step (phased scheduling needs it; unified rarely does).
        rows_tokens = max_batch_size * (spec.k + 1 if spec.speculative else 1)
        config = EngineConfig(dtype=dtype, max_batch_size=max_batch_size, kv_cache_tokens=kv_cache_tokens,
                              page_size=page_size, max_model_len=max_model_len,
                              max_num_batched_tokens=max_num_batched_tokens or max(256, rows_tokens),
                              prefill_chunk_size=prefill_chunk_size, attention_backend=attention_backend,
                              seed=seed, scheduler=scheduler, sync_host=sync_host, host_kv_tokens=host_kv_tokens,
                              tensor_parallel=tensor_parallel, unroll_layers=unroll_layers, burst_steps=burst_steps)
        started = time.perf_counter()
        loaded = load_model(model)
        self.load_seconds = time.perf_counter() - started
        self.model_name = str(model)
        check_tensor_parallel(loaded.config, tensor_parallel, self.model_name)
        self.tokenizer = loaded.tokenizer
        self.engine = Engine(loaded.config, loaded.params, loaded.tokenizer, config, spec)

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 chat: bool = False, request_ids: Sequence[str] | None = None, use_tqdm: bool = False,
                 on_output: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids); outputs come back in input order.

        The whole call is validated before any work starts: a bad prompt raises ValueError naming its index.
        `on_output` is called as each request finishes (for streaming results to a file).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                       else list(sampling_params))
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params_list)} for {len(prompts)} prompts")
        ids = [str(i) for i in range(len(prompts))] if request_ids is None else [str(i) for i in request_ids]
        if len(ids) != len(prompts):
            raise ValueError(f"request_ids: got {len(ids)} for {len(prompts)} prompts")

        encoded = []
        for prompt in prompts:
            if isinstance(prompt, str):
                encoded.append((prompt, self.encode_prompt(prompt, chat)))
            else:
                token_ids = [int(t) for t in prompt]
                encoded.append((self.tokenizer.decode(token_ids), token_ids))
        for index, ((_, token_ids), params) in enumerate(zip(encoded, params_list)):
            self.engine.validate(token_ids, params, f"prompt {index}")
        requests = [self.engine.add_request(token_ids, params, request_id, text)
                    for (text, token_ids), params, request_id in zip(encoded, params_list, ids)]

        progress = None
        if use_tqdm:
            from tqdm import tqdm
            progress = tqdm(total=len(requests), desc="generate", unit="req")

        def finished(request: Request) -> None:
            if progress is not None:
                progress.update(1)
            if on_output is not None:
                on_output(request.to_output())

        try:
            self.engine.run(on_finish=finished)
        finally:
            if progress is not None:
                progress.close()
        return [request.to_output() for request in requests]


__all__ = ["LLM", "RequestError", "RequestOutput", "SamplingParams", "EngineConfig", "SpecConfig"]
