"""Checks that the local OpenAI test server is usable by the official client."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator

import httpx2
import openai
import pytest

try:  # default "prepend" import mode puts tests/ on sys.path
    from openai_test_server import (
        IncomingRequest,
        OpenAITestServer,
        Reply,
        billing_key,
        by_body_hash,
        chat_response_tokens,
        drop_connection,
        insufficient_quota,
        malformed_json,
        prompt_token_logprobs,
        rate_limited,
        server_error,
        slow,
    )
except ImportError:  # --import-mode=importlib, run from the repo root
    from tests.openai_test_server import (
        IncomingRequest,
        OpenAITestServer,
        Reply,
        billing_key,
        by_body_hash,
        chat_response_tokens,
        drop_connection,
        insufficient_quota,
        malformed_json,
        prompt_token_logprobs,
        rate_limited,
        server_error,
        slow,
    )

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
    resp = client.chat.completions.create(
        model=MODEL, messages=messages, logprobs=True, top_logprobs=0, max_tokens=50, temperature=1.0, seed=0
    )
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
    resp = client.chat.completions.create(
        model=MODEL, messages=messages, logprobs=True, top_logprobs=0, max_completion_tokens=2
    )
    tokens, logprobs, finish = chat_response_tokens(MODEL, messages, 2)
    assert finish == "length" and len(tokens) == 2
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == "".join(tokens)
    assert [t.logprob for t in resp.choices[0].logprobs.content] == logprobs  # type: ignore[union-attr]


def test_chat_sentinel_logprob(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "please emit a SENTINEL"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, logprobs=True, top_logprobs=0, max_tokens=30)
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
        client.chat.completions.create(
            model="no-logprobs-model", messages=[{"role": "user", "content": "hi"}], logprobs=True
        )
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
    resp = client.completions.create(model="test-completion-model", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
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


def test_slots_queue_model_answers_fifo_and_time_out_a_short_client() -> None:
    with OpenAITestServer(latency_s=0.1, slots=1) as srv, make_client(srv) as c:
        done: list[tuple[int, float]] = []
        errors: list[BaseException] = []

        def call(i: int) -> None:
            try:
                started = time.monotonic()
                c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}])
                done.append((i, time.monotonic() - started))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:  # 20 ms apart, so the arrival order is known
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join(timeout=10)
        assert errors == [] and srv.peak_in_slots == 1 and srv.peak_in_flight == 4
        assert [i for i, _ in done] == [0, 1, 2, 3]  # first come, first served
        # the i-th waits for the i before it: latency ≈ 0.1 (i + 1) - 0.02 i
        for i, latency in done:
            assert latency >= 0.1 * (i + 1) - 0.02 * i - 0.01
        assert done[-1][1] >= 0.3
        # A client whose timeout is shorter than the queue gives up; the server still computes its answer.
        srv.reset_stats()
        first = threading.Thread(target=call, args=(10,))
        first.start()
        time.sleep(0.02)
        with pytest.raises(openai.APITimeoutError):
            c.chat.completions.create(model=MODEL, messages=HI, timeout=0.05)
        first.join(timeout=10)
        deadline = time.monotonic() + 5
        while srv.billed_total() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.billed_total() == 2 and srv.peak_in_slots == 1
    # More slots, more at once; without slots nothing is counted and latency applies as before.
    with OpenAITestServer(latency_s=0.1, slots=2) as srv, make_client(srv) as c:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert errors == [] and srv.peak_in_slots == 2 and 0.2 <= time.monotonic() - started < 0.35
    with pytest.raises(ValueError):
        OpenAITestServer(slots=0)


# ---------------------------------------------------------------------------
# Fault factories: each surfaces as the documented client-side exception
# ---------------------------------------------------------------------------

HI = [{"role": "user", "content": "hi"}]


def test_rate_limited_fault_is_rate_limit_error_with_retry_hints(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    server.reset_stats()
    server.add_fault(rate_limited(retry_after_ms=50))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert info.value.status_code == 429
    assert info.value.code == "rate_limit_exceeded" and info.value.type == "requests"
    assert info.value.response.headers["retry-after-ms"] == "50"
    assert "retry-after" not in info.value.response.headers
    assert "x-ratelimit-remaining-requests" not in info.value.response.headers  # fault replies are verbatim
    server.add_fault(rate_limited(retry_after_ms=None, retry_after_s=1.5))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert info.value.response.headers["retry-after"] == "1.5"
    assert "retry-after-ms" not in info.value.response.headers
    assert server.billed_total() == 0  # faults never reach the model


def test_insufficient_quota_is_a_429_told_apart_by_its_body(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.add_fault(insufficient_quota())
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert info.value.status_code == 429
    assert info.value.code == "insufficient_quota" and info.value.type == "insufficient_quota"
    assert info.value.body == {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_error_is_internal_server_error(status: int, client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.add_fault(server_error(status))
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert info.value.status_code == status and info.value.type == "server_error"


def test_slow_fault_times_the_client_out_but_still_bills() -> None:
    with OpenAITestServer() as srv, make_client(srv) as c:
        srv.add_fault(slow(0.3))
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError) as info:  # a subclass of APIConnectionError
            c.chat.completions.create(model=MODEL, messages=HI, timeout=0.05)
        assert time.monotonic() - started < 0.25
        assert isinstance(info.value.__cause__, httpx2.ReadTimeout)
        # The server finishes the abandoned request and bills it, like the real API would.
        deadline = time.monotonic() + 3
        while srv.billed_total() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.billed_total() == 1
        assert srv.errors == []  # writing to the departed client is not a server error


def test_drop_connection_is_api_connection_error(client: openai.OpenAI, server: OpenAITestServer) -> None:
    client.chat.completions.create(model=MODEL, messages=HI)  # warm a keep-alive connection
    server.add_fault(drop_connection())
    with pytest.raises(openai.APIConnectionError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert not isinstance(info.value, openai.APITimeoutError)
    assert isinstance(info.value.__cause__, httpx2.RemoteProtocolError)
    # The pool recovers: the next call opens a fresh connection.
    assert client.chat.completions.create(model=MODEL, messages=HI).choices[0].message.content


def test_malformed_json_is_a_plain_json_decode_error(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.add_fault(malformed_json())
    # openai 3.54 does not wrap it: the stdlib JSONDecodeError (a ValueError) escapes, not an OpenAIError.
    with pytest.raises(json.JSONDecodeError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert not isinstance(info.value, openai.OpenAIError)


def test_matched_fault_waits_for_its_request(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.add_fault(rate_limited(), match="target-7")
    server.add_fault(server_error(502))  # plain FIFO fault queued behind the matched one
    with pytest.raises(openai.InternalServerError):  # non-matching request passes the matched fault by
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "other"}])
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "other"}])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "target-7"}])
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "target-7"}])  # consumed
    assert server.faults == []


def test_fail_always_with_deterministic_fraction() -> None:
    def run() -> list[int]:
        with OpenAITestServer() as srv, make_client(srv) as c:
            srv.fail_always(by_body_hash(0.3, rate_limited()))
            failed = []
            for i in range(40):
                try:
                    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}])
                except openai.RateLimitError:
                    failed.append(i)
            # A retry of a failed body gets a fresh draw, so retrying eventually succeeds.
            for i in failed:
                for _ in range(20):
                    try:
                        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}])
                        break
                    except openai.RateLimitError:
                        pass
                else:
                    pytest.fail(f"q{i} never succeeded")
            assert srv.billed_total() == 40
            srv.fail_always(None)
            c.chat.completions.create(model=MODEL, messages=HI)
            return failed

    first = run()
    assert 0 < len(first) < 40
    assert run() == first  # deterministic across servers

    def custom(req: IncomingRequest) -> Reply | None:
        return Reply(418, {"error": {"message": "teapot", "type": "x", "param": None, "code": None}})

    with OpenAITestServer() as srv, make_client(srv) as c:
        srv.fail_always(custom)
        for _ in range(2):
            with pytest.raises(openai.APIStatusError) as info:
                c.models.list()
            assert info.value.status_code == 418


# ---------------------------------------------------------------------------
# Billing ledger and idempotency
# ---------------------------------------------------------------------------


def test_idempotent_replay_is_billed_once() -> None:
    with OpenAITestServer() as srv, make_client(srv) as c:
        key = {"Idempotency-Key": "logical-request-1"}
        srv.add_fault(rate_limited())  # a failed attempt with the key is not stored
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model=MODEL, messages=HI, extra_headers=key)
        first = c.chat.completions.with_raw_response.create(model=MODEL, messages=HI, extra_headers=key)
        again = c.chat.completions.with_raw_response.create(model=MODEL, messages=HI, extra_headers=key)
        assert again.headers.get("Idempotent-Replayed") == "true" and "Idempotent-Replayed" not in first.headers
        assert again.parse().id == first.parse().id  # the stored reply, verbatim
        assert srv.billed == {"logical-request-1": 1} and srv.billed_total() == 1
        with pytest.raises(openai.BadRequestError, match="same parameters"):
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "other"}], extra_headers=key)
        # Without a key (the official client sends none by itself) the ledger keys on the body hash,
        # so a duplicate request shows up as a count of 2.
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "dup"}])
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "dup"}])
        dup_keys = [k for k, n in srv.billed.items() if n == 2]
        assert len(dup_keys) == 1 and re.fullmatch(r"[0-9a-f]{64}", dup_keys[0])
        # The body hash is of the exact bytes the client sent (its compact JSON encoding).
        sent = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "dup"}]}, separators=(",", ":")
        ).encode()
        assert billing_key(sent) == dup_keys[0]
        assert billing_key(b"x", "k") == "k"
        assert srv.billed_total() == 3


def test_concurrent_request_with_same_key_gets_409() -> None:
    with OpenAITestServer() as srv, make_client(srv) as c:
        key = {"Idempotency-Key": "busy"}
        # Faults (slow() included) run in front of the idempotency layer, so slow the model itself
        # to keep the first request in flight inside it.
        model_reply = srv._model_reply

        def slow_model(path: str, body: dict) -> Reply:
            time.sleep(0.25)
            return model_reply(path, body)

        srv._model_reply = slow_model  # type: ignore[method-assign]
        results: list[object] = []
        t = threading.Thread(
            target=lambda: results.append(c.chat.completions.create(model=MODEL, messages=HI, extra_headers=key))
        )
        t.start()
        time.sleep(0.1)
        with pytest.raises(openai.ConflictError) as info:
            c.chat.completions.create(model=MODEL, messages=HI, extra_headers=key)
        assert info.value.code == "idempotency_key_in_use"
        t.join(timeout=5)
        replay = c.chat.completions.create(model=MODEL, messages=HI, extra_headers=key)
        assert replay.id == results[0].id  # type: ignore[attr-defined]
        assert srv.billed == {"busy": 1}


def test_retry_after_slow_fault_with_same_key_bills_once() -> None:
    # The timed-out original finishes after its retry and gets the retry's stored reply.
    with OpenAITestServer() as srv, make_client(srv) as c:
        key = {"Idempotency-Key": "logical-2"}
        srv.add_fault(slow(0.2))
        with pytest.raises(openai.APITimeoutError):
            c.chat.completions.create(model=MODEL, messages=HI, extra_headers=key, timeout=0.05)
        retried = c.chat.completions.create(model=MODEL, messages=HI, extra_headers=key)
        time.sleep(0.25)  # let the original finish server-side
        assert srv.billed == {"logical-2": 1}
        assert c.chat.completions.create(model=MODEL, messages=HI, extra_headers=key).id == retried.id
        assert srv.errors == []


# ---------------------------------------------------------------------------
# Rate-limit headers, enforcement, request timing
# ---------------------------------------------------------------------------

_RESET_RE = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


def test_ratelimit_headers_decrease() -> None:
    with OpenAITestServer(rpm_limit=100, tpm_limit=5000) as srv, make_client(srv) as c:
        a = c.chat.completions.with_raw_response.create(model=MODEL, messages=HI)
        b = c.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "b c"}])
        assert a.headers["x-ratelimit-limit-requests"] == "100" and a.headers["x-ratelimit-limit-tokens"] == "5000"
        assert int(a.headers["x-ratelimit-remaining-requests"]) == 99
        assert int(b.headers["x-ratelimit-remaining-requests"]) == 98
        used_a = a.parse().usage.total_tokens  # type: ignore[union-attr]
        used_b = b.parse().usage.total_tokens  # type: ignore[union-attr]
        assert int(a.headers["x-ratelimit-remaining-tokens"]) == 5000 - used_a
        assert int(b.headers["x-ratelimit-remaining-tokens"]) == 5000 - used_a - used_b
        for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
            assert _RESET_RE.match(b.headers[h]), b.headers[h]
        # Defaults are generous, and every normal reply (not only chat) carries them.
        models = c.models.with_raw_response.list()
        assert models.headers["x-ratelimit-remaining-requests"] == "98"
    with OpenAITestServer() as srv, make_client(srv) as c:
        h = c.chat.completions.with_raw_response.create(model=MODEL, messages=HI).headers
        assert h["x-ratelimit-limit-requests"] == "10000" and h["x-ratelimit-limit-tokens"] == "10000000"


def test_enforce_limits_429_until_the_window_frees() -> None:
    with OpenAITestServer(rpm_limit=3, enforce_limits=True, rate_window_s=0.25) as srv, make_client(srv) as c:
        for i in range(3):
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"r{i}"}])
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model=MODEL, messages=HI)
        assert info.value.code == "rate_limit_exceeded" and info.value.type == "requests"
        wait_ms = int(info.value.response.headers["retry-after-ms"])
        assert 0 < wait_ms <= 250
        assert info.value.response.headers["x-ratelimit-remaining-requests"] == "0"
        time.sleep(wait_ms / 1000 + 0.02)
        c.chat.completions.create(model=MODEL, messages=HI)
        assert srv.billed_total() == 4
        assert len(srv.request_times) == len(srv.requests) == 5
        assert srv.request_times == sorted(srv.request_times)
        assert srv.request_times[-1] - srv.request_times[0] >= wait_ms / 1000
    # Token limit: the second request's estimate (words + max_tokens) does not fit.
    with OpenAITestServer(tpm_limit=30, enforce_limits=True, rate_window_s=5) as srv, make_client(srv) as c:
        c.chat.completions.create(model=MODEL, messages=HI, max_tokens=20)
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model=MODEL, messages=HI, max_tokens=20)
        assert info.value.type == "tokens" and int(info.value.response.headers["retry-after-ms"]) > 0


# ---------------------------------------------------------------------------
# Batch API
# ---------------------------------------------------------------------------


def _batch_line(custom_id: str, content: str) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "logprobs": True,
            "top_logprobs": 0,
            "max_tokens": 30,
        },
    }


def test_batch_roundtrip() -> None:
    ids = [f"req-{i}" for i in range(8)]
    lines = [_batch_line(cid, f"question {cid} é") for cid in ids]
    lines[3]["body"]["messages"][0]["content"] = "please BATCHFAIL this"
    payload = ("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n").encode("utf-8")
    with OpenAITestServer(batch_polls_to_complete=3) as srv, make_client(srv) as c:
        uploaded = c.files.create(file=("in.jsonl", payload, "application/jsonl"), purpose="batch")
        assert uploaded.id.startswith("file-") and uploaded.purpose == "batch" and uploaded.bytes == len(payload)
        assert uploaded.filename == "in.jsonl" and uploaded.status == "processed"
        assert c.files.content(uploaded.id).content == payload  # exact bytes, multipart parsed losslessly
        batch = c.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "t1"}
        )
        assert batch.status == "validating" and batch.output_file_id is None and batch.metadata == {"run": "t1"}
        assert batch.request_counts is not None and batch.request_counts.total == 8
        assert srv.batches_created == 1 and srv.billed_total() == 0
        statuses = [c.batches.retrieve(batch.id).status for _ in range(3)]
        assert statuses == ["in_progress", "finalizing", "completed"]
        done = c.batches.retrieve(batch.id)
        assert done.status == "completed" and done.completed_at is not None
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (7, 1)
        assert done.output_file_id and done.error_file_id

        out = [json.loads(x) for x in c.files.content(done.output_file_id).content.splitlines()]
        got_ids = [row["custom_id"] for row in out]
        expected_ids = [cid for cid in ids if cid != "req-3"]
        assert sorted(got_ids) == sorted(expected_ids) and got_ids != expected_ids  # shuffled
        by_id = {line["custom_id"]: line for line in lines}
        for row in out:
            assert row["id"].startswith("batch_req_") and row["error"] is None
            assert row["response"]["status_code"] == 200 and row["response"]["request_id"]
            body = by_id[row["custom_id"]]["body"]
            tokens, logprobs, _ = chat_response_tokens(MODEL, body["messages"], 30)
            answer = row["response"]["body"]
            assert answer["choices"][0]["message"]["content"] == "".join(tokens)
            assert [t["logprob"] for t in answer["choices"][0]["logprobs"]["content"]] == logprobs
        errors = [json.loads(x) for x in c.files.content(done.error_file_id).content.splitlines()]
        assert [e["custom_id"] for e in errors] == ["req-3"]
        assert errors[0]["response"]["status_code"] == 400 and "error" in errors[0]["response"]["body"]

        assert srv.billed == {f"batch:{batch.id}:{cid}": 1 for cid in expected_ids}
        c.batches.retrieve(batch.id)  # polling a finished batch runs nothing again
        assert srv.billed_total() == 7
        assert done.usage is not None and done.usage.total_tokens > 0
        assert srv.errors == []


def test_batch_validation_cancel_and_unknown_ids() -> None:
    with OpenAITestServer(batch_polls_to_complete=1, batch_shuffle=False) as srv, make_client(srv) as c:
        bad = (json.dumps(_batch_line("a", "x")) + "\n" + '{"custom_id": "b", "method": "POST"\n').encode()
        f = c.files.create(file=("bad.jsonl", bad, "application/jsonl"), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="line 2"):
            c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        wrong_url = {**_batch_line("a", "x"), "url": "/v1/embeddings"}
        f2 = c.files.create(file=("u.jsonl", json.dumps(wrong_url).encode(), "application/jsonl"), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="line 1"):
            c.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert srv.batches_created == 0
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve("batch_does_not_exist")
        with pytest.raises(openai.NotFoundError):
            c.files.content("file-nope")

        good = "".join(json.dumps(_batch_line(f"g{i}", f"x{i}")) + "\n" for i in range(3)).encode()
        g = c.files.create(file=("g.jsonl", good, "application/jsonl"), purpose="batch")
        to_cancel = c.batches.create(input_file_id=g.id, endpoint="/v1/chat/completions", completion_window="24h")
        cancelled = c.batches.cancel(to_cancel.id)
        assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
        assert c.batches.retrieve(to_cancel.id).status == "cancelled"
        finished = c.batches.create(input_file_id=g.id, endpoint="/v1/chat/completions", completion_window="24h")
        done = c.batches.retrieve(finished.id)  # batch_polls_to_complete=1
        assert done.status == "completed" and done.error_file_id is None
        rows = [json.loads(x) for x in c.files.content(done.output_file_id or "").content.splitlines()]
        assert [r["custom_id"] for r in rows] == ["g0", "g1", "g2"]  # batch_shuffle=False keeps input order
        with pytest.raises(openai.BadRequestError):
            c.batches.cancel(finished.id)
        assert srv.batches_created == 2 and srv.billed_total() == 3
