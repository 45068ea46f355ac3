"""The API client under scripted faults, against the real local OpenAI-protocol server."""

import math
import sqlite3
import time

import pytest

from api_client import OpenAIChatOracle, RetryPolicy
from batch_api import collect_results, submit_batch, wait_for_batch
from errors import OracleError, UserError
from openai_test_server import (
    OpenAITestServer,
    by_body_hash,
    chat_response_tokens,
    drop_connection,
    insufficient_quota,
    malformed_json,
    rate_limited,
    server_error,
    slow,
)
from rate_limits import RateLimiter, TokenBucket, parse_reset
from reward_oracle import TASKS
from spend_ledger import CostTracker, ResponseCache, load_prices, price_for

FAST_RETRY = dict(max_attempts=5, base_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(api_key="test-key") as srv:
        yield srv


def make_oracle(server, tmp_path=None, **kwargs) -> OpenAIChatOracle:
    options = dict(
        max_tokens=10, max_workers=4, base_url=server.base_url, retry=RetryPolicy(**FAST_RETRY), timeout_s=2.0
    )
    options.update(kwargs)
    return OpenAIChatOracle("gpt-4o-mini", TASKS["raw"], **options)


def expected_log_likelihood(text: str, max_tokens: int = 10) -> float:
    return math.fsum(chat_response_tokens("gpt-4o-mini", TASKS["raw"].messages(text), max_tokens)[1])


def test_every_transient_fault_is_retried_scored_once_and_billed_once(server):
    faults = {
        "t-429": rate_limited(retry_after_ms=30),
        "t-500": server_error(500),
        "t-503": server_error(503),
        "t-slow": slow(3.0),
        "t-drop": drop_connection(),
        "t-json": malformed_json(),
    }
    for text, fault in faults.items():
        server.add_fault(fault, match=text)
    oracle = make_oracle(server, timeout_s=0.5)
    texts = list(faults) + ["t-plain-1", "t-plain-2"]
    results = oracle.score(texts)
    for text, result in zip(texts, results):
        assert result.valid, (text, result.error)
        assert result.log_likelihood == pytest.approx(expected_log_likelihood(text))
    stats = oracle.stats()
    assert stats["retries"] == len(faults) and stats["failed"] == 0
    time.sleep(3.0)  # let the abandoned slow request finish on the server: it is billed, but only once
    assert all(count == 1 for count in server.billed.values()) and server.billed_total() == len(texts)
    assert server.errors == []
    oracle.close()


def test_a_request_that_keeps_failing_is_recorded_with_its_reason(server):
    server.fail_always(lambda req: server_error(500)(req) if b"DOOMED" in req.raw_body else None)
    oracle = make_oracle(server, retry=RetryPolicy(max_attempts=3, base_delay_s=0.01))
    ok, doomed = oracle.score(["fine", "DOOMED input"])
    assert ok.valid and not doomed.valid
    assert doomed.error == "failed after 3 attempts: HTTP 500" and math.isnan(doomed.log_likelihood)
    assert oracle.stats()["failed"] == 1
    assert sum(b"DOOMED" in r["messages"][0]["content"].encode() for r in server.requests) == 3


def test_retry_after_ms_is_honoured(server):
    server.add_fault(rate_limited(retry_after_ms=400))
    oracle = make_oracle(server, max_workers=1)
    (result,) = oracle.score(["wait for me"])
    assert result.valid
    first, second = server.request_times
    assert second - first >= 0.38


def test_insufficient_quota_stops_at_once(server):
    server.add_fault(insufficient_quota())
    oracle = make_oracle(server, max_workers=1)
    with pytest.raises(OracleError, match="out of quota"):
        oracle.score(["hi"])
    assert len(server.requests) == 1  # a 429 that retrying cannot fix is not retried


def test_permission_and_bad_request_errors_are_not_retried(server):
    oracle = OpenAIChatOracle(
        "no-logprobs-model", TASKS["raw"], base_url=server.base_url, retry=RetryPolicy(**FAST_RETRY)
    )
    with pytest.raises(OracleError, match="does not allow logprobs"):
        oracle.score(["hi"])
    assert len(server.requests) == 1
    bad = make_oracle(server, max_tokens=10)
    bad.request_for = lambda x: ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []})
    with pytest.raises(OracleError, match="HTTP 400"):
        bad.score(["hi"])
    assert len(server.requests) == 2


def test_bounded_concurrency_with_ten_percent_429s(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(api_key="test-key", latency_s=0.05) as srv:
        srv.fail_always(by_body_hash(0.1, rate_limited(retry_after_ms=10)))
        oracle = make_oracle(srv, max_workers=5, retry=RetryPolicy(max_attempts=10, base_delay_s=0.01))
        results = oracle.score([f"request {i}" for i in range(60)])
        assert all(r.valid for r in results)
        assert srv.peak_in_flight <= 5
        assert oracle.stats()["retries"] >= 1
        assert all(count == 1 for count in srv.billed.values()) and srv.billed_total() == 60


def test_requests_per_minute_is_respected(server):
    oracle = make_oracle(server, max_workers=8, rpm=600)  # 10 a second, bursts of one second's worth
    oracle.score([f"rate {i}" for i in range(30)])
    times = sorted(server.request_times)
    # A token bucket of capacity C at rate r allows at most C + r * W requests in any window W.
    for i, start in enumerate(times):
        in_window = sum(1 for t in times[i:] if t - start <= 1.0)
        assert in_window <= 10 + 10 * 1.0 + 1
    assert times[-1] - times[0] >= (30 - 10) / 10 - 0.1


def test_rate_limit_headers_pause_new_requests():
    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(clock=lambda: now[0], sleep=sleep)
    limiter.acquire(10)
    assert slept == []
    limiter.observe_headers(
        {"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "2.5s"}, in_flight_hint=4
    )
    limiter.acquire(10)
    assert sum(slept) == pytest.approx(2.5)
    limiter.observe_headers(
        {"x-ratelimit-remaining-tokens": "10", "x-ratelimit-limit-tokens": "100000", "x-ratelimit-reset-tokens": "20ms"}
    )
    limiter.acquire(10)
    assert sum(slept) == pytest.approx(2.52)
    assert (
        parse_reset("6m0s") == 360 and parse_reset("1h2m3.5s") == pytest.approx(3723.5) and parse_reset("20ms") == 0.02
    )


def test_token_bucket_refills_continuously():
    now = [0.0]
    bucket = TokenBucket(per_minute=60, clock=lambda: now[0])  # 1 a second, capacity 1
    assert bucket.wait_time(1) == 0
    bucket.take(1)
    assert bucket.wait_time(1) == pytest.approx(1.0)
    now[0] = 0.5
    assert bucket.wait_time(1) == pytest.approx(0.5)


def test_cache_makes_repeats_free_and_survives_reopening(server, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    oracle = make_oracle(server, cache_path=path, temperature=0.0)
    texts = ["same one", "same one", "other"]
    first = oracle.score(texts)
    assert len(server.requests) == 2  # the duplicate in one batch is sent once
    oracle.close()
    again = make_oracle(server, cache_path=path, temperature=0.0)
    second = again.score(texts)
    assert len(server.requests) == 2 and again.stats()["cache_hits"] == 2
    assert [r.log_likelihood for r in first] == [r.log_likelihood for r in second]
    again.close()
    different = make_oracle(server, cache_path=path, temperature=0.5)  # another sampling parameter: another key
    different.score(["other"])
    assert len(server.requests) == 3
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 3
    with open(path, "rb") as f:
        assert b"test-key" not in f.read()


def test_corrupt_cache_is_a_clear_error(tmp_path):
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="not a usable SQLite database"):
        ResponseCache(str(path))


def test_cost_counts_cached_input_tokens_and_prices_can_be_overridden(tmp_path):
    prices = load_prices(None)
    assert price_for("gpt-4o-mini-2024-07-18", prices) == prices["gpt-4o-mini"]
    assert price_for("my-local-model", prices) is None
    tracker = CostTracker("gpt-4o-mini", prices)
    dollars = tracker.add_usage(
        {"prompt_tokens": 1000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 400}}
    )
    assert dollars == pytest.approx((600 * 0.15 + 400 * 0.075 + 100 * 0.60) / 1e6)
    assert tracker.snapshot()["cached_tokens"] == 400
    custom = tmp_path / "prices.json"
    custom.write_text('{"my-local-model": {"input": 1.0, "output": 2.0}}')
    assert price_for("my-local-model", load_prices(str(custom)))["cached_input"] == 1.0
    custom.write_text('{"my-local-model": {"input": -1}}')
    with pytest.raises(UserError, match="non-negative"):
        load_prices(str(custom))


def test_batch_api_round_matches_out_of_order_results_and_reports_the_failed_line(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(api_key="test-key", batch_polls_to_complete=3) as srv:
        oracle = make_oracle(srv, cache_path=str(tmp_path / "cache.sqlite"))
        texts = [f"batch input {i}" for i in range(7)] + ["this one BATCHFAIL", "batch input 0"]
        batch_id = submit_batch(oracle, texts)
        polls = []
        batch = wait_for_batch(oracle, batch_id, poll_seconds=0.01, on_poll=lambda b: polls.append(b.status))
        assert polls[-1] == "completed" and len(polls) >= 3
        results = collect_results(oracle, batch, texts)
        for text, result in zip(texts, results):
            if "BATCHFAIL" in text:
                assert not result.valid and result.error.startswith("batch: HTTP 400")
            else:
                assert result.valid and result.log_likelihood == pytest.approx(expected_log_likelihood(text))
        assert (
            srv.batches_created == 1 and srv.billed_total() == 7
        )  # one line per distinct input; the failed one is not billed
        stats = oracle.stats()
        assert stats["failed"] == 1
        # Batch API requests cost half: the same usage synchronously would cost twice as much.
        sync = CostTracker("gpt-4o-mini", load_prices(None))
        for r in results[:7]:
            sync.add_usage(r.usage)
        assert stats["dollars"] == pytest.approx(0.5 * sync.snapshot()["dollars"]) and stats["dollars"] > 0
        # a second round with the same inputs is answered from the cache: nothing is submitted
        assert submit_batch(oracle, texts[:7]) is None and srv.batches_created == 1


def test_adaptive_concurrency_keeps_a_one_slot_server_from_queueing_and_fixed_does_not(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(api_key="test-key", latency_s=0.05, slots=1, honour_idempotency=False) as srv:
        adaptive = make_oracle(srv, max_workers=8)
        for batch in range(3):
            assert all(r.valid for r in adaptive.score([f"adaptive {batch} {i}" for i in range(8)]))
        stats, limiter = adaptive.stats(), adaptive.concurrency.stats()
        # slow start stops at 2 (the first reply of each batch is not queued, the rest wait one service time);
        # now and then a round tries 3 and comes back
        assert limiter["mean_limit"] <= 2.5 and limiter["peak_in_flight"] <= 4 and srv.peak_in_flight <= 4
        assert stats["concurrency_limit"] <= 3 and stats["retries"] == 0
        assert limiter["replies"] == 24 and limiter["in_flight"] == 0 and not limiter["fixed"]
        adaptive.close()
        srv.reset_stats()
        fixed = make_oracle(srv, max_workers=8, adaptive_concurrency=False)
        assert all(r.valid for r in fixed.score([f"fixed {i}" for i in range(8)]))
        # all 8 at once (unless the client is too slow to send the 8th before the first is answered)
        assert fixed.stats()["concurrency_limit"] == 8 and srv.peak_in_flight >= 6 and srv.peak_in_slots == 1
        fixed.close()


def test_timeouts_429_and_503_are_overload_the_rest_leave_the_limit_alone(server):
    server.add_fault(rate_limited(retry_after_ms=10), match="t-429")
    server.add_fault(server_error(503), match="t-503")
    server.add_fault(server_error(500), match="t-500")
    server.add_fault(slow(1.0), match="t-slow")
    oracle = make_oracle(server, max_workers=4, timeout_s=0.3)
    for text in ("t-429", "t-503", "t-500", "t-slow"):  # one at a time: each attempt is its own round
        (result,) = oracle.score([text])
        assert result.valid
    stats = oracle.concurrency.stats()
    assert stats["overloads"] == 3 and stats["errors"] == 1 and stats["replies"] == 4 and stats["in_flight"] == 0
