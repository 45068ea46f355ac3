"""The API oracle at the boundary with real servers: logprobs as llama.cpp returns them, the model and the
server checked before paying, misaligned echo logprobs refused, a dead server stopping the run, the spend
ledger surviving kill -9, and no batch paid for that is not trained on. All against the local OpenAI-protocol
server, which behaves like llama.cpp where noted."""

import glob
import json
import math
import shutil
import signal
import socket
import sqlite3
import time

import pytest
from cli_helpers import run_main
from test_api_training import api_flags, chat_requests, start_training, wait_until

from api_client import OpenAIChatOracle, preflight
from checkpoint import load_checkpoint
from errors import OracleError, UserError
from openai_test_server import OpenAITestServer, drop_connection, prompt_token_logprobs
from reward_oracle import TASKS


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(api_key="test-key") as srv:
        yield srv


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_chat_requests_ask_for_top_logprobs_so_llama_cpp_returns_logprobs(server):
    # Like llama.cpp, the test server returns "logprobs": null unless top_logprobs is given.
    import openai

    client = openai.OpenAI(api_key="test-key", base_url=server.base_url)
    bare = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], logprobs=True
    )
    assert bare.choices[0].logprobs is None
    oracle = OpenAIChatOracle("gpt-4o-mini", TASKS["raw"], max_tokens=8, base_url=server.base_url)
    (result,) = oracle.score(["hi"])
    oracle.close()
    assert result.valid and math.isfinite(result.log_likelihood)
    assert server.requests[-1]["top_logprobs"] == 0 and server.requests[-1]["logprobs"] is True


def test_plain_format_uses_the_completions_endpoint(server):
    oracle = OpenAIChatOracle(
        "gpt-4o-mini", TASKS["raw"], max_tokens=6, base_url=server.base_url, prompt_format="plain"
    )
    (result,) = oracle.score(["The quick brown fox"])
    oracle.close()
    request = server.requests[-1]
    assert request["_path"] == "/v1/completions" and request["prompt"] == "The quick brown fox"
    full = "The quick brown fox" + result.response
    tokens, logprobs, _ = prompt_token_logprobs("gpt-4o-mini", full)
    expected = math.fsum(logprobs[len(prompt_token_logprobs("gpt-4o-mini", "The quick brown fox")[0]) :])
    assert result.valid and result.log_likelihood == pytest.approx(expected)


def test_preflight_names_the_served_models_and_reports_a_dead_server_in_seconds(server):
    with pytest.raises(
        UserError, match=r"model 'gpt-5-turbo' is not served by .*it serves: gpt-4o-mini, no-logprobs-model"
    ):
        preflight("gpt-5-turbo", server.base_url, 60.0)
    assert preflight("gpt-4o-mini", server.base_url, 60.0) == []
    server.list_models = False  # llama.cpp-style servers without /v1/models: skipped, with a note
    assert "model check skipped" in preflight("anything", server.base_url, 60.0)[0]
    started = time.monotonic()
    with pytest.raises(UserError, match="cannot reach the oracle server"):
        preflight("gpt-4o-mini", f"http://127.0.0.1:{closed_port()}/v1", 60.0)
    assert time.monotonic() - started < 10


def test_training_with_a_wrong_model_or_dead_server_fails_before_loading_models(tiny_lm_dir, tmp_path, server):
    code, err = run_main(api_flags(tiny_lm_dir, tmp_path, server.base_url, "--model", "gpt-5-turbo", "--epochs", "1"))
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: model 'gpt-5-turbo' is not served")
    code, err = run_main(api_flags(tiny_lm_dir, tmp_path, f"http://127.0.0.1:{closed_port()}/v1", "--epochs", "1"))
    assert code == 2 and "cannot reach the oracle server" in err
    assert not server.billed and not glob.glob(str(tmp_path / "*.pt"))


def test_misaligned_echo_logprobs_are_refused_and_aligned_ones_pass(server):
    notes = preflight("gpt-4o-mini", server.base_url, 60.0, target_response=" Paris.")
    assert "echo alignment checked" in notes[0]
    server.echo_misaligned = True  # as llama-cpp-python's server for a model without a BOS token
    with pytest.raises(OracleError, match="misaligned"):
        preflight("gpt-4o-mini", server.base_url, 60.0, target_response=" Paris.")
    server.echo_misaligned, server.supports_echo = False, False
    with pytest.raises(OracleError, match="cannot score --target-response"):
        preflight("gpt-4o-mini", server.base_url, 60.0, target_response=" Paris.")


def dies_after(answers: int):
    """A server rule: answer the first `answers` chat requests, then drop every connection (a dead server)."""
    answered = {"n": 0}

    def rule(request):
        if request.path != "/v1/chat/completions":
            return None
        answered["n"] += 1
        return drop_connection()(request) if answered["n"] > answers else None

    return rule


def test_a_server_that_goes_away_stops_the_run_with_exit_2_and_a_checkpoint(tiny_lm_dir, tmp_path, server):
    server.fail_always(dies_after(12))  # three batches of 4
    started = time.monotonic()
    code, err = run_main(
        api_flags(
            tiny_lm_dir,
            tmp_path,
            server.base_url,
            "--epochs",
            "1000",
            "--save-every",
            "1000",
            "--max-attempts",
            "2",
            "--max-unreachable-batches",
            "2",
            "--no-prefetch",
        )
    )
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the oracle server stopped answering: every request of the last 2 batches failed")
    # three epochs trained, the fourth's batch all failed (skipped), the fifth's too: stop with epoch 4 saved
    assert "unreachable" in last and "checkpoint_gfn_raw_epoch4.pt" in last
    assert load_checkpoint(str(tmp_path / "checkpoint_gfn_raw_epoch4.pt"))["epoch"] == 4
    assert time.monotonic() - started < 60


def test_a_server_process_that_dies_mid_run_stops_it_within_a_minute_with_default_flags(tiny_lm_dir, tmp_path, server):
    """The server closes its port after 8 answers (a crashed process: connections are refused). With the default
    8 attempts per request and 3 unreachable batches, each refused request used to wait out its whole backoff,
    about a minute a batch; the shared refusal clock gives up after 10 s of refusals, so the run stops with exit 2,
    one line and a checkpoint well within 60 s."""
    import threading

    answered = {"n": 0}

    def crash_after_8(request):
        if request.path != "/v1/chat/completions":
            return None
        answered["n"] += 1
        if answered["n"] > 8:
            threading.Thread(target=server.stop, daemon=True).start()  # the process is gone: the port closes
            return drop_connection()(request)
        return None

    server.fail_always(crash_after_8)
    started = time.monotonic()
    code, err = run_main(api_flags(tiny_lm_dir, tmp_path, server.base_url, "--epochs", "1000", "--no-prefetch"))
    elapsed = time.monotonic() - started
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the oracle server stopped answering: every request of the last 3 batches")
    assert "checkpoint_gfn_raw_epoch" in last and elapsed < 45, (elapsed, last)
    rows = [json.loads(line) for line in open(tmp_path / "samples_raw.jsonl")]
    assert any("connection refused for 10 s" in (row.get("error") or "") for row in rows)


def test_refusal_clock_gives_up_only_after_the_grace_and_resets_on_an_answer():
    from api_client import RefusalClock, RetryPolicy, call_with_retries

    now = {"t": 0.0}
    clock = RefusalClock(grace_s=10.0, clock=lambda: now["t"])
    assert not clock.refused()  # first refusal at t=0
    now["t"] = 9.9
    assert not clock.refused()
    clock.answered()  # the server came back: the count starts again
    now["t"] = 15.0
    assert not clock.refused()
    now["t"] = 25.0
    assert clock.refused()

    import httpx2
    import openai

    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")

    def refuse():
        try:
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        except httpx2.ConnectError as exc:
            raise openai.APIConnectionError(request=request) from exc

    def time_out():
        raise openai.APITimeoutError(request=request)

    slept = []
    # a refusing server already past its grace: one attempt, no sleeping
    value, failure = call_with_retries(refuse, RetryPolicy(max_attempts=8), "m", sleep=slept.append, refusals=clock)
    assert value is None and failure.startswith("unreachable: failed after 1 attempts: connection refused")
    assert slept == []
    # a slow server (timeouts) is retried to the last attempt whatever the clock says
    _, failure = call_with_retries(time_out, RetryPolicy(max_attempts=4), "m", sleep=slept.append, refusals=clock)
    assert failure == "unreachable: failed after 4 attempts: APITimeoutError" and len(slept) == 3


def test_repeats_from_the_response_cache_do_not_keep_a_dead_server_alive(word_lm_dirs, tmp_path, server):
    # x of one or two words over a 4-word vocabulary repeat from the first batches on: once the server is gone,
    # every batch mixes cache hits (fine) with sent requests (all failed). The run must still stop.
    prior, _ = word_lm_dirs
    server.fail_always(dies_after(8))
    flags = api_flags(
        prior, tmp_path, server.base_url, "--epochs", "40", "--save-every", "1000", "--max-attempts", "2",
        "--max-unreachable-batches", "2", "--no-prefetch", "--max-len", "2", "--min-len", "1", "--batch-size", "8",
    )  # fmt: skip
    code, err = run_main(flags)
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("error: the oracle server stopped answering")
    rows = [json.loads(line) for line in open(tmp_path / "samples_raw.jsonl")]
    epochs = {row["epoch"] for row in rows}
    hits = {row["epoch"] for row in rows if (row.get("usage") or {}).get("cached_response")}
    dead = {row["epoch"] for row in rows if (row.get("error") or "").startswith("unreachable")}
    assert hits & dead  # a batch had both: the case that kept the run going under the old rule
    assert max(epochs) < 10


def test_unreachable_count_ignores_cache_hits_and_batches_that_sent_nothing():
    from reward_oracle import OracleResult
    from train import sent_requests, unreachable_batches_after

    dead = OracleResult.failed("unreachable: failed after 2 attempts: APIConnectionError", unreachable=True)
    hit = OracleResult("y", -1.0, 1, usage={"cached_response": True})
    answered = OracleResult("y", -1.0, 1)
    assert unreachable_batches_after(sent_requests([dead, hit, dead]), 1) == 2
    assert unreachable_batches_after(sent_requests([hit, hit]), 1) == 1
    assert unreachable_batches_after(sent_requests([dead, answered]), 1) == 0


def ledger_dollars(path) -> float:
    with sqlite3.connect(str(path)) as db:
        return db.execute("SELECT COALESCE(SUM(dollars), 0) FROM spend").fetchone()[0]


def test_spending_after_the_last_checkpoint_survives_kill_9(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4o-mini": {"input": 1000.0, "output": 1000.0}}))
    with OpenAITestServer(api_key="test-key", latency_s=0.03) as server:
        argv = api_flags(
            tiny_lm_dir, tmp_path, server.base_url, "--epochs", "30", "--save-every", "4", "--prices", str(prices)
        )
        proc = start_training(argv, "test-key")
        try:  # kill well after the epoch-4 checkpoint, before the next one
            wait_until(lambda: glob.glob(str(tmp_path / "checkpoint_*epoch4.pt")) and len(chat_requests(server)) >= 26)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        checkpoint = load_checkpoint(sorted(glob.glob(str(tmp_path / "checkpoint_*.pt")))[-1])
        paid_before_kill = ledger_dollars(tmp_path / "response_cache.sqlite")
        assert paid_before_kill > checkpoint["api_totals"]["dollars"] + 1e-9  # spent after the checkpoint
        code, err = run_main(argv + ["--resume"])
        assert code == 0, err
        final = load_checkpoint(str(tmp_path / "checkpoint_gfn_raw_epoch30.pt"))
        # nothing paid is forgotten: the run's total is the ledger's, which is what the server billed
        assert final["api_totals"]["dollars"] == pytest.approx(ledger_dollars(tmp_path / "response_cache.sqlite"))
        assert final["api_totals"]["requests"] == server.billed_total()
        assert final["api_totals"]["dollars"] == pytest.approx(server.billed_tokens * 1000.0 / 1e6)


def test_prefetch_pays_for_no_batch_it_does_not_train_on_and_resume_trains_on_the_paid_batch(
    tiny_lm_dir, tmp_path, server
):
    straight = tmp_path / "straight"
    code, err = run_main(
        api_flags(tiny_lm_dir, straight, server.base_url, "--epochs", "3", "--save-every", "1", "--prefetch")
    )
    assert code == 0, err
    assert len(chat_requests(server)) == 3 * 4 == server.billed_total()  # not 4 batches: none sent after the last
    # a run resumed from the epoch-1 checkpoint trains on the batch paid for ahead of it, from the cache,
    # and goes on exactly as the uninterrupted run did, paying for nothing new
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "checkpoint_gfn_raw_epoch1.pt", resumed)
    shutil.copy(straight / "response_cache.sqlite", resumed)
    assert (
        load_checkpoint(str(resumed / "checkpoint_gfn_raw_epoch1.pt"))["source_state"]["prefetched"]["tokens"].shape[0]
        == 4
    )
    billed = server.billed_total()
    code, err = run_main(
        api_flags(tiny_lm_dir, resumed, server.base_url, "--epochs", "3", "--save-every", "1", "--prefetch", "--resume")
    )
    assert code == 0, err
    assert server.billed_total() == billed

    def losses(folder):
        return {m["epoch"]: m["train/loss"] for m in map(json.loads, open(folder / "metrics_raw.jsonl"))}

    assert losses(resumed) == pytest.approx({e: loss for e, loss in losses(straight).items() if e > 1}, rel=1e-6)
    samples = [json.loads(line) for line in open(resumed / "samples_raw.jsonl")]
    assert all(s["trained"] for s in samples) and isinstance(samples[0]["x_retokenises"], bool)
    metrics = [json.loads(line) for line in open(resumed / "metrics_raw.jsonl")]
    assert all("train/retokenised_changed" in m for m in metrics)  # x crossed the boundary as text
