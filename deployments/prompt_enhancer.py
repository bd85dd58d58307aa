"""The prompt enhancer deployment: a causal language model that rewrites image prompts.

Served in the same Ray application as the image models, as its own deployment (the
ingress never runs a model). Production configs name a small instruct model (a folder or
hub id with a chat template); the built-in ``builtin:tiny-enhancer``
(``builtin_models/prompt_enhancer.py``) is a Qwen2 causal LM with random weights and a
tokenizer built offline, so the real code path (chat template, ``generate``, decoding) runs
in tests and in the embedded default. Its rewrites are gibberish, as random weights are; a
request's ``revised_prompt`` shows them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from deployments.weights import resolve_source
from serve_app.config import PromptEnhancerConfig

logger = logging.getLogger("ray.serve")

# A rewrite shorter than this many tokens is not one; it also keeps a model whose first
# token is its end-of-text from answering with nothing.
MIN_NEW_TOKENS = 4


class PromptEnhancerDeployment:
    def __init__(self, config: PromptEnhancerConfig | dict[str, Any], cache_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = PromptEnhancerConfig.model_validate(config)
        assert self.config.weights is not None, "an in-graph enhancer needs weights"
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        source = resolve_source(self.config.weights, cache_dir)  # builtin:tiny-enhancer: built on first use
        self._tokenizer = AutoTokenizer.from_pretrained(source)
        self._model = AutoModelForCausalLM.from_pretrained(source).to(self.config.device).eval()
        # A rewrite is text: no chat-control tokens other than the end of the answer.
        end = self._model.generation_config.eos_token_id
        ends = set(end if isinstance(end, list) else [end])
        self._suppressed = [i for i in self._tokenizer.all_special_ids if i not in ends] or None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enhancer")
        logger.info("prompt enhancer ready (%s on %s)", self.config.weights, self.config.device)

    async def enhance(self, prompt: str) -> str:
        """The rewritten prompt ('' when the model wrote nothing usable)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.rewrite, prompt)

    def rewrite(self, prompt: str) -> str:
        import torch

        messages = [{"role": "system", "content": self.config.instruction}, {"role": "user", "content": prompt}]
        inputs = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.config.device)
        with torch.inference_mode():
            output = self._model.generate(
                **inputs,
                max_new_tokens=self.config.max_new_tokens,
                min_new_tokens=min(MIN_NEW_TOKENS, self.config.max_new_tokens),
                do_sample=False,  # one prompt, one rewrite: reproducible
                suppress_tokens=self._suppressed,
                # Greedy decoding of a small model loops on one phrase (or one newline).
                repetition_penalty=1.3,
                no_repeat_ngram_size=3,
                pad_token_id=self._tokenizer.pad_token_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self._tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


PromptEnhancer = serve.deployment(PromptEnhancerDeployment)
