"""Prompt enhancement as the ingress sees it: ask the configured enhancer, bounded in time.

Two enhancers, one interface (``enhance(prompt) -> str``): the in-graph text-generation
deployment (``deployments/prompt_enhancer.py``, reached through its handle) and an
external OpenAI-compatible chat endpoint. Either may fail or be slow; ``enhance_prompt``
never lets that fail the request or hang it: past ``timeout_s``, or on any error, the
original prompt is used and the response says so in a header (README, "Prompt
enhancement").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from serve_app.config import PromptEnhancerConfig

logger = logging.getLogger("ray.serve")

# The response header that says what became of enhance_prompt: "applied" or "failed".
ENHANCE_HEADER = "x-prompt-enhancement"
_SPACES = re.compile(r"\s+")


class PromptEnhancer(Protocol):
    async def enhance(self, prompt: str) -> str: ...


@dataclass(frozen=True)
class Enhancement:
    prompt: str  # the prompt to generate with
    applied: bool  # False: the enhancer failed and ``prompt`` is the original


class ServedEnhancer:
    """The enhancer deployment of this application, through its Serve handle."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def enhance(self, prompt: str) -> str:
        return await self._handle.enhance.remote(prompt)


class EnhancerBusy(Exception):
    """Every call the chat endpoint may have in flight is taken: fall back at once."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: urllib would resend the Authorization header (the
    enhancer's API key) to wherever it points, another host included."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class ChatEndpointEnhancer:
    """An OpenAI-compatible ``POST {url}/chat/completions``."""

    # Calls in flight at most, on threads of their own: urlopen's timeout is per socket
    # operation, so a trickling endpoint holds a thread past ``enhance_prompt``'s timeout,
    # and on the shared default executor that would starve every other ``to_thread`` user
    # (image decoding, replica counts). Past this many, enhancement fails at once.
    MAX_CALLS = 4

    def __init__(self, config: PromptEnhancerConfig) -> None:
        assert config.url is not None
        self._config = config
        self._endpoint = config.url.rstrip("/") + "/chat/completions"
        self._opener = urllib.request.build_opener(_NoRedirects)
        self._executor = ThreadPoolExecutor(max_workers=self.MAX_CALLS, thread_name_prefix="prompt-enhancer")
        self._slots = threading.BoundedSemaphore(self.MAX_CALLS)  # released when the thread is done

    async def enhance(self, prompt: str) -> str:
        if not self._slots.acquire(blocking=False):
            raise EnhancerBusy(f"{self.MAX_CALLS} prompt enhancer calls are already in flight")
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, self._post_in_slot, prompt)
        except BaseException:
            self._slots.release()
            raise
        return await future

    def _post_in_slot(self, prompt: str) -> str:
        try:
            return self._post(prompt)
        finally:
            self._slots.release()

    def _post(self, prompt: str) -> str:
        config = self._config
        body = {
            "model": config.model,
            "messages": [{"role": "system", "content": config.instruction}, {"role": "user", "content": prompt}],
            "max_tokens": config.max_new_tokens,
            "temperature": 0,
        }
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(self._endpoint, data=json.dumps(body).encode(), headers=headers)
        with self._opener.open(request, timeout=config.timeout_s) as response:
            answer = json.loads(response.read(1024 * 1024))
        content = answer["choices"][0]["message"]["content"]
        if not isinstance(content, str):  # null (a refusal, a tool call) or parts: no prompt
            raise TypeError(f"the chat endpoint answered a {type(content).__name__} content, not text")
        return content


def build_enhancer(config: PromptEnhancerConfig | None, handle: Any | None) -> PromptEnhancer | None:
    if config is None:
        return None
    if config.url is not None:
        return ChatEndpointEnhancer(config)
    return None if handle is None else ServedEnhancer(handle)


def clean_rewrite(text: str, max_chars: int) -> str:
    """A model's rewrite as a prompt: printable characters, single spaces, bounded."""
    printable = "".join(ch if ch.isprintable() and ch != "\ufffd" else " " for ch in text)
    return _SPACES.sub(" ", printable).strip()[:max_chars].strip()


async def enhance_prompt(enhancer: PromptEnhancer, prompt: str, timeout_s: float, max_chars: int) -> Enhancement:
    """The enhanced prompt, or the original one when the enhancer fails, is slow, or
    answers with nothing usable."""
    try:
        rewrite = await asyncio.wait_for(enhancer.enhance(prompt), timeout=timeout_s)
        if not isinstance(rewrite, str):  # never a prompt such as "None"
            raise TypeError(f"the enhancer answered a {type(rewrite).__name__}, not text")
        cleaned = clean_rewrite(rewrite, max_chars)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure has the same documented outcome
        logger.warning("prompt enhancement failed (%s); using the original prompt", type(exc).__name__)
        return Enhancement(prompt=prompt, applied=False)
    if not cleaned:
        logger.warning("prompt enhancement returned no text; using the original prompt")
        return Enhancement(prompt=prompt, applied=False)
    return Enhancement(prompt=cleaned, applied=True)
