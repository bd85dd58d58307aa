"""Serving logic of the safety checker's verdicts, the per-key safety permission and prompt
enhancement, against fakes (real SQLite accounts): what is delivered is what is charged."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.accounts import Accounts, LocalRateLimiter, issue_key, open_store
from serve_app.config import CREDIT_UNITS, AppConfig
from serve_app.enhancer import ENHANCE_HEADER, clean_rewrite
from serve_app.errors import ContentFlagged, InvalidRequest, PermissionDenied
from serve_app.serving import FLAGGED_HEADER, ImageGenerationService
from tests.fakes import FakeRouter, answer, serve
from tests.test_serving import CONFIG, balance

WITH_ENHANCER = AppConfig.model_validate(
    {**CONFIG.model_dump(), "prompt_enhancer": {"url": "http://127.0.0.1:9/v1", "timeout_s": 0.5}}
)


def FlaggingRouter(flagged_seeds):
    """Marks the images of the given seeds as flagged by the model's safety checker."""
    return FakeRouter(flag_seeds=flagged_seeds)


class Enhancer:
    def __init__(self, answer=None, failure=None, delay=0.0):
        self.answer, self.failure, self.delay = answer, failure, delay
        self.prompts = []

    async def enhance(self, prompt):
        self.prompts.append(prompt)
        await asyncio.sleep(self.delay)
        if self.failure is not None:
            raise self.failure
        return self.answer


@pytest.fixture
def accounts(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/ledger.db")
    accounts = Accounts(store, default_rpm=1000, default_ipm=1000, rate_limiter=LocalRateLimiter())
    yield accounts
    accounts.close()


def make_key(accounts, credits=10, name="k", **options):
    return issue_key(accounts.store, name, credits_units=int(credits * CREDIT_UNITS), **options).secret


async def generate(svc, key, **fields):
    served = await serve(svc, key, {"model": "m", "prompt": "apple", **fields}, request_id="req_x")
    await answer(served)
    return served


def test_flagged_images_are_neither_delivered_nor_charged(accounts):
    key = make_key(accounts)
    svc = ImageGenerationService(CONFIG, FlaggingRouter({6}), accounts)
    served = asyncio.run(generate(svc, key, n=3, seed=5))
    assert [item.seed for item in served.body.data] == [5, 7]
    assert served.headers["x-credits-charged"] == "3"  # 2 images x 1.5
    assert served.headers[FLAGGED_HEADER] == "1"
    assert asyncio.run(balance(accounts, key)) == 7


def test_all_flagged_is_a_400_with_its_code_and_a_full_refund(accounts):
    key = make_key(accounts)
    svc = ImageGenerationService(CONFIG, FlaggingRouter({5, 6}), accounts)
    with pytest.raises(ContentFlagged) as caught:
        asyncio.run(generate(svc, key, n=2, seed=5))
    assert caught.value.status_code == 400 and caught.value.code == "content_policy_violation"
    assert asyncio.run(balance(accounts, key)) == 10
    assert accounts.store.inconsistencies() == []


def test_disable_safety_checker_needs_the_operators_permission(accounts):
    router = FakeRouter()
    svc = ImageGenerationService(CONFIG, router, accounts)
    plain = make_key(accounts, name="plain")
    with pytest.raises(PermissionDenied) as caught:
        asyncio.run(generate(svc, plain, disable_safety_checker=True))
    assert caught.value.status_code == 403 and caught.value.param == "disable_safety_checker"
    assert router.calls == [] and asyncio.run(balance(accounts, plain)) == 10
    allowed = make_key(accounts, name="allowed", may_disable_safety_checker=True)
    asyncio.run(generate(svc, allowed, disable_safety_checker=True))
    assert router.calls[-1][0].check_safety is False
    asyncio.run(generate(svc, plain))
    assert router.calls[-1][0].check_safety is True
    # The operator's switch, as `imagegen keys safety-checker NAME deny-disable` flips it.
    assert accounts.store.set_safety_permission("allowed", False).may_disable_safety_checker is False


def test_enhance_prompt_without_an_enhancer_is_a_400(accounts):
    key = make_key(accounts)
    with pytest.raises(InvalidRequest) as caught:
        asyncio.run(generate(ImageGenerationService(CONFIG, FakeRouter(), accounts), key, enhance_prompt=True))
    assert caught.value.param == "enhance_prompt"
    assert asyncio.run(balance(accounts, key)) == 10


def test_the_enhanced_prompt_is_generated_and_returned(accounts):
    key = make_key(accounts)
    router, enhancer = FakeRouter(), Enhancer(answer="  a crisp red apple,\n studio light \x07")
    svc = ImageGenerationService(WITH_ENHANCER, router, accounts, enhancer=enhancer)
    served = asyncio.run(generate(svc, key, enhance_prompt=True))
    assert enhancer.prompts == ["apple"]
    assert router.calls[0][0].prompt == "a crisp red apple, studio light"
    assert served.body.data[0].revised_prompt == "a crisp red apple, studio light"
    assert served.headers[ENHANCE_HEADER] == "applied"
    plain = asyncio.run(generate(svc, key))
    assert plain.body.data[0].revised_prompt == "apple" and ENHANCE_HEADER not in plain.headers


@pytest.mark.parametrize(
    "enhancer", [Enhancer(failure=ConnectionError("down")), Enhancer(answer="late", delay=5), Enhancer(answer=" \x00 ")]
)
def test_an_enhancer_failure_uses_the_original_prompt_and_says_so(accounts, enhancer):
    key = make_key(accounts)
    router = FakeRouter()
    svc = ImageGenerationService(WITH_ENHANCER, router, accounts, enhancer=enhancer)
    served = asyncio.run(asyncio.wait_for(generate(svc, key, enhance_prompt=True), timeout=3))  # never a hang
    assert served.headers[ENHANCE_HEADER] == "failed"
    assert served.body.data[0].revised_prompt == "apple" and router.calls[0][0].prompt == "apple"
    assert served.headers["x-credits-charged"] == "1.5"


def test_clean_rewrite_bounds_and_cleans():
    assert clean_rewrite("a\tb\n\nc\ufffd", 100) == "a b c"
    assert clean_rewrite("x" * 50, 10) == "x" * 10


def test_an_openai_compatible_chat_endpoint_enhances(accounts):
    """``prompt_enhancer.url``: the service posts OpenAI's chat completions request."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from serve_app.enhancer import build_enhancer

    seen = []

    class Chat(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body))
            answer = {"choices": [{"message": {"role": "assistant", "content": "an apple, oil painting"}}]}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Chat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = AppConfig.model_validate(
            {
                **CONFIG.model_dump(),
                "prompt_enhancer": {"url": f"http://127.0.0.1:{server.server_port}/v1", "model": "small-instruct"},
            }
        )
        svc = ImageGenerationService(
            config, FakeRouter(), accounts, enhancer=build_enhancer(config.prompt_enhancer, None)
        )
        served = asyncio.run(generate(svc, make_key(accounts), enhance_prompt=True))
    finally:
        server.shutdown()
    assert served.body.data[0].revised_prompt == "an apple, oil painting"
    path, _, body = seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "small-instruct"
    assert body["messages"][-1] == {"role": "user", "content": "apple"}


class _ChatServer:
    """A chat endpoint on 127.0.0.1 whose answer the test sets: ``respond(handler)``."""

    def __init__(self, respond):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = []
        chat = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                chat.requests.append((self.path, self.headers.get("Authorization")))
                respond(self)

            def do_GET(self):  # where urllib follows a redirected POST
                chat.requests.append((self.path, self.headers.get("Authorization")))
                respond(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _answer(handler, content):
    import json

    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _chat_enhancer(url, **fields):
    from serve_app.config import PromptEnhancerConfig
    from serve_app.enhancer import ChatEndpointEnhancer

    return ChatEndpointEnhancer(PromptEnhancerConfig(url=url, **fields))


@pytest.mark.parametrize("content", [None, ["an", "apple"], {"text": "an apple"}, 7])
def test_a_chat_answer_without_text_content_is_a_failure(accounts, content):
    """A null content (a refusal, a tool call) or content parts is never the prompt "None"."""
    chat = _ChatServer(lambda handler: _answer(handler, content))
    try:
        router = FakeRouter()
        svc = ImageGenerationService(WITH_ENHANCER, router, accounts, enhancer=_chat_enhancer(chat.url))
        served = asyncio.run(generate(svc, make_key(accounts), enhance_prompt=True))
    finally:
        chat.close()
    assert len(chat.requests) == 1
    assert served.headers[ENHANCE_HEADER] == "failed"
    assert served.body.data[0].revised_prompt == "apple" and router.calls[0][0].prompt == "apple"


def test_the_enhancer_api_key_never_follows_a_redirect(monkeypatch):
    """urllib would resend the Authorization header to the redirect's target, another host
    included: a redirect is a failure instead."""
    from serve_app.enhancer import enhance_prompt

    elsewhere = _ChatServer(lambda handler: _answer(handler, "an apple, stolen"))

    def redirect(handler):
        handler.send_response(302)  # urllib follows it for a POST (as a GET), headers and all
        handler.send_header("Location", elsewhere.url.replace("127.0.0.1", "localhost") + "/chat/completions")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    chat = _ChatServer(redirect)
    monkeypatch.setenv("ENHANCER_TEST_KEY", "sk-enhancer-secret")
    try:
        enhancer = _chat_enhancer(chat.url, api_key_env="ENHANCER_TEST_KEY")
        enhancement = asyncio.run(enhance_prompt(enhancer, "apple", 5, 4000))
    finally:
        chat.close()
        elsewhere.close()
    assert chat.requests == [("/v1/chat/completions", "Bearer sk-enhancer-secret")]
    assert elsewhere.requests == []
    assert (enhancement.prompt, enhancement.applied) == ("apple", False)


def test_a_stuck_chat_endpoint_holds_only_the_enhancers_own_threads():
    """urlopen's timeout is per socket operation: a call the endpoint holds keeps its thread
    past enhance_prompt's timeout. Those threads are the enhancer's own and bounded; once
    all are held, enhancement fails at once without another request, and the default
    executor is free for everything else."""
    import threading

    from serve_app.enhancer import ChatEndpointEnhancer, enhance_prompt

    release = threading.Event()

    def held(handler):
        release.wait(10)
        _answer(handler, "an apple, at last")

    chat = _ChatServer(held)
    try:
        enhancer = _chat_enhancer(chat.url, timeout_s=30)

        async def run():
            limit = ChatEndpointEnhancer.MAX_CALLS
            stuck = await asyncio.gather(*(enhance_prompt(enhancer, "apple", 0.3, 4000) for _ in range(limit)))
            # The default executor still has every thread: each of these runs.
            free = await asyncio.gather(*(asyncio.to_thread(lambda: "ok") for _ in range(8)))
            refused = await enhance_prompt(enhancer, "apple", 0.3, 4000)
            reached = len(chat.requests)
            release.set()
            for _ in range(100):  # the held calls finish and give their threads back
                await asyncio.sleep(0.05)
                if (again := await enhance_prompt(enhancer, "apple", 5, 4000)).applied:
                    break
            return stuck, free, refused, reached, again, limit

        stuck, free, refused, reached, again, limit = asyncio.run(run())
    finally:
        release.set()
        chat.close()
    assert [e.applied for e in stuck] == [False] * limit and free == ["ok"] * 8
    assert reached == limit and (refused.prompt, refused.applied) == ("apple", False)
    assert (again.prompt, again.applied) == ("an apple, at last", True)
