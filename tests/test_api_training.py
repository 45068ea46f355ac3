"""The training loop with a remote oracle: kill -9 and resume, the cost budget, Batch API rounds."""

import glob
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from cli_helpers import run_main, tiny_flags

from checkpoint import load_checkpoint
from openai_test_server import OpenAITestServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def api_flags(model_dir: str, output_dir, base_url: str, *extra: str) -> list[str]:
    return tiny_flags(
        model_dir,
        output_dir,
        "--oracle",
        "openai",
        "--base-url",
        base_url,
        "--model",
        "gpt-4o-mini",
        "--seed",
        "3",
        *extra,
    )


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def chat_requests(server) -> list[dict]:
    return [r for r in server.requests if r["_path"] == "/v1/chat/completions"]


def start_training(argv, env_key: str) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": env_key}
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


def test_kill_9_then_resume_pays_only_for_what_was_not_answered(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(api_key="test-key", latency_s=0.03) as server:
        argv = api_flags(tiny_lm_dir, tmp_path, server.base_url, "--epochs", "40", "--save-every", "4")
        proc = start_training(argv, "test-key")
        try:
            wait_until(
                lambda: (
                    len(glob.glob(str(tmp_path / "checkpoint_*epoch8.pt"))) == 1 and len(chat_requests(server)) >= 42
                )
            )
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        before_resume = len(server.requests)
        keys_before = {r["_idempotency_key"] for r in chat_requests(server)}
        with sqlite3.connect(str(tmp_path / "response_cache.sqlite")) as db:
            cached = {row[0][:48] for row in db.execute("SELECT key FROM responses")}
        assert len(cached) >= 32  # answers received before the kill were cached as they arrived

        code, err = run_main(argv + ["--resume"])
        assert code == 0, err
        resumed = [r for r in server.requests[before_resume:] if r["_path"] == "/v1/chat/completions"]
        # Nothing that had been answered before the kill was sent again...
        assert not {r["_idempotency_key"] for r in resumed} & cached
        # ...the resumed run replayed the epochs after its checkpoint from the cache...
        final = load_checkpoint(str(tmp_path / "checkpoint_gfn_raw_epoch40.pt"))
        assert final["api_totals"]["cache_hits"] >= 1
        # ...and, in all, every distinct request was billed exactly once.
        assert all(count == 1 for count in server.billed.values())
        assert server.billed_total() == len(keys_before | {r["_idempotency_key"] for r in resumed})
    samples = [json.loads(line) for line in open(tmp_path / "samples_raw.jsonl")]
    assert {s["epoch"] for s in samples} >= set(range(1, 41))


def test_max_cost_stops_cleanly_with_a_checkpoint(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4o-mini": {"input": 1000.0, "output": 1000.0}}))  # $0.001 a token
    with OpenAITestServer(api_key="test-key") as server:
        budget = 0.2
        code, err = run_main(
            api_flags(
                tiny_lm_dir,
                tmp_path,
                server.base_url,
                "--epochs",
                "100",
                "--prices",
                str(prices),
                "--max-cost",
                str(budget),
                "--no-prefetch",
            )
        )
        assert code == 0, err
        assert "budget" in err
        checkpoints = glob.glob(str(tmp_path / "checkpoint_*.pt"))
        assert len(checkpoints) == 1
        state = load_checkpoint(checkpoints[0])
        assert 1 <= state["epoch"] < 100
        spent = state["api_totals"]["dollars"]
        assert spent <= budget
        tokens = state["api_totals"]["prompt_tokens"] + state["api_totals"]["completion_tokens"]
        assert spent == pytest.approx(tokens * 1000.0 / 1e6)
        assert server.billed_total() == state["api_totals"]["requests"]
    code, err = run_main(
        api_flags(tiny_lm_dir, tmp_path / "x", "http://127.0.0.1:9/v1", "--model", "my-model", "--max-cost", "1")
    )
    assert code == 2 and "no price known for model 'my-model'" in err


def test_batch_api_training_and_resume_mid_batch(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(api_key="test-key", batch_polls_to_complete=400) as server:
        argv = api_flags(
            tiny_lm_dir,
            tmp_path,
            server.base_url,
            "--batch-api",
            "--batch-pool-size",
            "8",
            "--batch-poll-seconds",
            "0.05",
            "--epochs",
            "4",
            "--save-every",
            "100",
        )
        proc = start_training(argv, "test-key")
        try:  # the run checkpoints the submitted batch before polling; kill it while the batch is pending
            wait_until(lambda: server.batches_created == 1 and glob.glob(str(tmp_path / "checkpoint_*epoch0.pt")))
            time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        pending = load_checkpoint(str(tmp_path / "checkpoint_gfn_raw_epoch0.pt"))["source_state"]
        assert pending["batch_id"] and len(pending["texts"]) == 8
        server.batch_polls_to_complete = 2
        code, err = run_main(argv + ["--resume"])
        assert code == 0, err
        # the pending batch was picked up, not paid for again; the second round was a new batch
        assert server.batches_created == 2
        assert all(count == 1 for count in server.billed.values())
        assert not chat_requests(server)  # no synchronous requests in Batch API mode
    samples = [json.loads(line) for line in open(tmp_path / "samples_raw.jsonl")]
    assert len(samples) == 16 and all(s["valid"] for s in samples)
    assert [s["x"] for s in samples[:8]] == pending["texts"]
    final = load_checkpoint(str(tmp_path / "checkpoint_gfn_raw_epoch4.pt"))
    assert final["api_totals"]["dollars"] > 0 and final["epoch"] == 4
