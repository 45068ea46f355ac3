"""The OpenAI oracle against a real local HTTP server speaking the OpenAI protocol (no client mocking)."""

import math

import pytest

from api_client import OpenAIChatOracle, RetryPolicy, api_key_from_env
from errors import OracleError, UserError
from openai_test_server import OpenAITestServer, chat_response_tokens, prompt_token_logprobs
from reward_oracle import TASKS


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(api_key="test-key") as srv:
        yield srv


def test_chat_logprobs_are_summed_and_truncation_recorded(server):
    task = TASKS["assistant"]
    oracle = OpenAIChatOracle("gpt-4o-mini", task, max_tokens=12, max_workers=4, base_url=server.base_url)
    texts = [f"question number {i}" for i in range(12)]
    results = oracle.score(texts)
    assert len(server.requests) == 12
    for text, result in zip(texts, results):
        tokens, logprobs, finish = chat_response_tokens("gpt-4o-mini", task.messages(text), 12)
        assert result.valid and result.response == "".join(tokens)
        assert result.log_likelihood == pytest.approx(math.fsum(logprobs))
        assert result.truncated == (finish == "length")
        assert result.usage["completion_tokens"] == len(tokens)
    assert any(r.truncated for r in results) and not all(r.truncated for r in results)
    body = server.requests[0]
    assert body["logprobs"] is True and body["max_tokens"] == 12 and body["messages"][0]["role"] == "system"
    oracle.close()


def test_sentinel_logprob_makes_the_sample_invalid(server):
    oracle = OpenAIChatOracle("gpt-4o-mini", TASKS["raw"], max_tokens=30, base_url=server.base_url)
    (result,) = oracle.score(["this has a SENTINEL inside"])
    assert not result.valid and result.error == "logprob_sentinel" and math.isnan(result.log_likelihood)


def test_workers_share_one_client_with_bounded_concurrency(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(api_key="test-key", latency_s=0.15) as srv:
        oracle = OpenAIChatOracle("gpt-4o-mini", TASKS["raw"], max_workers=6, base_url=srv.base_url)
        oracle.score([f"x{i}" for i in range(24)])
        assert srv.peak_in_flight == 6  # all workers busy at once, never more


def test_fatal_errors_are_one_line_oracle_errors(server, monkeypatch):
    oracle = OpenAIChatOracle("no-logprobs-model", TASKS["raw"], base_url=server.base_url)
    with pytest.raises(OracleError, match="does not allow logprobs.*gpt-4o-mini"):
        oracle.score(["hi"])
    monkeypatch.setenv("OPENAI_API_KEY", "wrong-key")
    oracle = OpenAIChatOracle("gpt-4o-mini", TASKS["raw"], base_url=server.base_url)
    with pytest.raises(OracleError, match="authentication failed") as info:
        oracle.score(["hi"])
    assert "wrong-key" not in str(info.value) and "\n" not in str(info.value)


def test_unreachable_server_is_a_recorded_failure_not_a_crash(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer() as srv:
        url = srv.base_url
    oracle = OpenAIChatOracle(
        "gpt-4o-mini", TASKS["raw"], base_url=url, retry=RetryPolicy(max_attempts=2, base_delay_s=0.01), timeout_s=2
    )
    (result,) = oracle.score(["hi"])
    assert not result.valid and result.error == "unreachable: failed after 2 attempts: APIConnectionError"
    assert result.unreachable


def test_fixed_target_uses_echoed_prompt_logprobs(server):
    task = TASKS["raw"]
    oracle = OpenAIChatOracle("served-model", task, base_url=server.base_url, target_response=" Paris is the capital.")
    (result,) = oracle.score(["The capital of France?"])
    full = task.plain_prompt("The capital of France?") + " Paris is the capital."
    tokens, logprobs, offsets = prompt_token_logprobs("served-model", full)
    prompt_len = len(task.plain_prompt("The capital of France?"))
    expected = [lp for off, lp in zip(offsets, logprobs) if off >= prompt_len]
    assert result.num_tokens == 4 and result.log_likelihood == pytest.approx(math.fsum(expected))
    assert server.requests[-1]["echo"] is True


def test_fixed_target_on_an_endpoint_without_echo_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(supports_echo=False) as srv:
        oracle = OpenAIChatOracle("gpt-4o-mini", TASKS["raw"], base_url=srv.base_url, target_response="yes")
        with pytest.raises(OracleError, match="cannot score --target-response.*vLLM"):
            oracle.score(["hi"])


def test_api_key_comes_from_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match="OPENAI_API_KEY is not set"):
        api_key_from_env(None)
    assert api_key_from_env("http://127.0.0.1:8000/v1") == "EMPTY"  # self-hosted servers need none
    monkeypatch.setenv("OPENAI_API_KEY", "sk-abc")
    assert api_key_from_env(None) == "sk-abc"
