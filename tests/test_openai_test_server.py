"""Checks that the local OpenAI test server is usable by the official client."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import openai
import pytest

try:  # default "prepend" import mode puts tests/ on sys.path
    from openai_test_server import OpenAITestServer, chat_response_tokens, prompt_token_logprobs
except ImportError:  # --import-mode=importlib, run from the repo root
    from tests.openai_test_server import OpenAITestServer, chat_response_tokens, prompt_token_logprobs

MODEL = "test-chat-model"


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as srv:
        yield srv


def make_client(srv: OpenAITestServer, api_key: str = "test-key") -> openai.OpenAI:
    # max_retries=0 so error statuses surface immediately instead of being retried.
    return openai.OpenAI(api_key=api_key, base_url=srv.base_url, max_retries=0, timeout=10)


@pytest.fixture()
def client(server: OpenAITestServer) -> Iterator[openai.OpenAI]:
    c = make_client(server)
    yield c
    c.close()


def test_chat_logprobs_match_pure_function(server: OpenAITestServer, client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
    server.reset_stats()
    resp = client.chat.completions.create(model=MODEL, messages=messages, logprobs=True, max_tokens=50,
                                          temperature=1.0, seed=0)
    tokens, logprobs, finish = chat_response_tokens(MODEL, messages, 50)
    choice = resp.choices[0]
    assert choice.message.content == "".join(tokens)
    assert choice.finish_reason == finish == "stop"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    got = [t.logprob for t in choice.logprobs.content]
    assert [t.token for t in choice.logprobs.content] == tokens
    assert math.isclose(sum(got), sum(logprobs), rel_tol=0, abs_tol=1e-12)
    assert all(-3.0 <= lp <= -0.01 for lp in got)
    assert resp.usage is not None and resp.usage.completion_tokens == len(tokens)
    assert resp.usage.prompt_tokens == 5  # words in the messages
    # The server saw exactly what the client sent.
    assert server.requests[-1]["_path"] == "/v1/chat/completions"
    assert server.requests[-1]["messages"] == messages
    assert server.errors == []


def test_chat_without_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages)
    assert plain.choices[0].logprobs is None
    top = client.chat.completions.create(model=MODEL, messages=messages, logprobs=True, top_logprobs=3)
    assert top.choices[0].message.content == plain.choices[0].message.content
    for entry in top.choices[0].logprobs.content:  # type: ignore[union-attr]
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) < 1.0


def test_chat_truncation_gives_length(client: openai.OpenAI) -> None:
    # Every full answer has at least 3 tokens, so max 2 always truncates.
    messages = [{"role": "user", "content": "tell me a long story"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, logprobs=True, max_completion_tokens=2)
    tokens, logprobs, finish = chat_response_tokens(MODEL, messages, 2)
    assert finish == "length" and len(tokens) == 2
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == "".join(tokens)
    assert [t.logprob for t in resp.choices[0].logprobs.content] == logprobs  # type: ignore[union-attr]


def test_chat_sentinel_logprob(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "please emit a SENTINEL"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, logprobs=True, max_tokens=30)
    content = resp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert content[1].logprob == -9999.0
    assert [t.logprob for t in content] == chat_response_tokens(MODEL, messages, 30)[1]


def test_wrong_key_is_401(server: OpenAITestServer) -> None:
    with make_client(server, api_key="wrong") as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"


def test_logprobs_forbidden_is_403(client: openai.OpenAI) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="no-logprobs-model", messages=[{"role": "user", "content": "hi"}],
                                       logprobs=True)
    assert "not allowed to request logprobs" in info.value.message
    # Without logprobs the same model answers normally.
    ok = client.chat.completions.create(model="no-logprobs-model", messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content


def test_missing_messages_is_400_and_unknown_path_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=MODEL, input="x")


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids


def test_completions_echo_scoring(server: OpenAITestServer, client: openai.OpenAI) -> None:
    prompt = "  The quick brown\nfox jumps. \n"
    resp = client.completions.create(model="test-completion-model", prompt=prompt, max_tokens=0, echo=True,
                                     logprobs=1)
    tokens, logprobs, offsets = prompt_token_logprobs("test-completion-model", prompt)
    assert "".join(tokens) == prompt
    choice = resp.choices[0]
    assert choice.text == prompt
    assert choice.finish_reason == "length"
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == tokens
    assert choice.logprobs.token_logprobs == logprobs
    assert choice.logprobs.text_offset == offsets
    assert logprobs[0] is None and all(-5.0 <= lp <= -0.01 for lp in logprobs[1:])  # type: ignore[operator]
    # Causal: a prompt extension leaves the shared prefix's logprobs unchanged.
    longer = prompt_token_logprobs("test-completion-model", prompt + "More words")[1]
    assert longer[: len(tokens) - 1] == logprobs[: len(tokens) - 1]


def test_completions_echo_unsupported_is_400() -> None:
    with OpenAITestServer(supports_echo=False) as srv, make_client(srv) as c:
        with pytest.raises(openai.BadRequestError) as info:
            c.completions.create(model="test-completion-model", prompt="a b", max_tokens=0, echo=True, logprobs=0)
        assert "echo with logprobs is not supported" in info.value.message
        # Plain generation still works.
        assert c.completions.create(model="test-completion-model", prompt="a b", max_tokens=3).choices[0].text


def test_peak_in_flight_under_concurrency() -> None:
    with OpenAITestServer(latency_s=0.2) as srv, make_client(srv) as c:
        errors: list[BaseException] = []

        def call(i: int) -> None:
            try:
                c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}])
            except BaseException as exc:  # collected so the main thread fails loudly
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert errors == []
        assert len(srv.requests) == 8
        assert srv.peak_in_flight >= 4
