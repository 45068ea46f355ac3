"""--oracle-proposal-fraction: x written by the local oracle itself, as off-policy exploration proposals."""

import sqlite3

import pytest
import torch
from cli_helpers import read_jsonl, run_main, tiny_flags

from hf_models import document_start_id, load_causal_lm
from openai_test_server import OpenAITestServer, chat_response_tokens
from reward_oracle import TASKS, HFResponseOracle, PriorScorer, RewardModel


def word_reward_model(word_lm_dirs) -> RewardModel:
    prior_dir, oracle_dir = word_lm_dirs
    prior_model, tokenizer = load_causal_lm(prior_dir)
    oracle_model, oracle_tokenizer = load_causal_lm(oracle_dir)
    oracle = HFResponseOracle(
        oracle_model, oracle_tokenizer, TASKS["raw"], target_response="a b", prompt_format="plain"
    )
    return RewardModel(tokenizer, PriorScorer(prior_model, tokenizer), oracle)


def test_proposals_are_the_oracles_own_samples_and_each_is_a_call(word_lm_dirs):
    reward_model = word_reward_model(word_lm_dirs)
    oracle = reward_model.oracle
    # one-token x: their frequencies are the oracle's next-token distribution after the document start (an x
    # that ends at once is dropped, so renormalised over the 4 words), by a naive forward pass
    with torch.no_grad():
        logits = oracle.model(torch.tensor([[document_start_id(oracle.tokenizer)]])).logits[0, -1].double()
    expected = torch.softmax(logits[:4], dim=0)
    ends_at_once = torch.softmax(logits, dim=0)[4].item()  # <|endoftext|>, the document end
    torch.manual_seed(0)
    rows = reward_model.propose_x(4000, 1, 1, set())
    assert all(len(row) == 1 for row in rows)
    assert len(rows) / 4000 == pytest.approx(1 - ends_at_once, abs=0.03)
    observed = torch.bincount(torch.tensor([row[0] for row in rows]), minlength=4).double() / len(rows)
    assert torch.allclose(observed, expected, atol=0.03), (observed, expected)
    assert expected.max() - expected.min() > 0.1  # the oracle's distribution is far from uniform: the test can fail
    assert reward_model.proposal_calls == reward_model.oracle_calls == reward_model.reward_calls == 4000
    # longer x: cut before any banned token, then to a length drawn from [min_len, length]
    rows = reward_model.propose_x(400, 2, 5, banned={0})
    assert rows and all(2 <= len(row) <= 5 and 0 not in row for row in rows)
    assert len({len(row) for row in rows}) == 4  # every length from 2 to 5 occurs
    assert reward_model.proposal_calls == 4400


def test_proposals_need_a_local_oracle(word_lm_dirs):
    reward_model = word_reward_model(word_lm_dirs)
    reward_model.llm_weight = 0  # prior only: no oracle to write x
    with pytest.raises(ValueError, match="need an oracle that writes x"):
        reward_model.propose_x(4, 1, 2, set())


def test_training_marks_the_oracles_x_and_counts_two_calls_for_each(tiny_lm_dir, tmp_path):
    flags = ["--epochs", "3", "--oracle-proposal-fraction", "0.5"]
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path, *flags))
    assert code == 0, err
    samples = read_jsonl(tmp_path / "samples_raw.jsonl")
    metrics = read_jsonl(tmp_path / "metrics_raw.jsonl")
    assert len(samples) == 12  # batch 4 x 3 epochs: proposals too short to use are made up by the policy
    assert metrics[-1]["train/proposal_calls"] == 6  # 2 asked for per epoch, each one an oracle call
    assert metrics[-1]["train/reward_calls"] == metrics[-1]["train/oracle_calls"] == 12 + 6
    for epoch in (1, 2, 3):
        written = [s["written_by_oracle"] for s in samples if s["epoch"] == epoch]
        assert written == sorted(written, reverse=True) and sum(written) <= 2  # the batch's first rows
    assert sum(s["written_by_oracle"] for s in samples) >= 1
    for bad, message in (
        (["--oracle", "openai", "--model", "m"], "needs an oracle that writes x itself"),
        (["--prefetch"], "synchronous batches"),
        (["--llm-weight", "0"], "needs an oracle that writes x itself"),
    ):
        code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "bad", "--oracle-proposal-fraction", "0.5", *bad))
        assert code == 2 and message in err and "Traceback" not in err, err
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "bad", "--oracle-proposal-fraction", "1.5"))
    assert code == 2 and "must be in [0, 1]" in err


def test_a_completions_server_writes_x_and_every_one_is_paid_for_once(tiny_lm_dir, tmp_path, monkeypatch):
    """--oracle openai --oracle-format plain: the served model writes x through its completions endpoint, one
    seeded request each (so they differ and are cached apart), in the spend ledger like any answer."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAITestServer(api_key="test-key") as server:
        flags = ["--oracle", "openai", "--base-url", server.base_url, "--model", "gpt-4o-mini"]
        flags += ["--oracle-format", "plain", "--oracle-proposal-fraction", "0.5", "--epochs", "3"]
        code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path, *flags))
        assert code == 0, err
        proposals = [r for r in server.requests if r.get("seed") is not None]
        assert sorted(r["seed"] for r in proposals) == list(range(6))  # 2 an epoch, each its own seed
        assert all(r["prompt"] == "" and r["temperature"] == 1.0 and r["max_tokens"] == 6 for r in proposals)
        assert all(count == 1 for count in server.billed.values())
        billed = server.billed_total()
    samples = read_jsonl(tmp_path / "samples_raw.jsonl")
    metrics = read_jsonl(tmp_path / "metrics_raw.jsonl")
    assert metrics[-1]["train/proposal_calls"] == 6 and metrics[-1]["train/reward_calls"] == 12 + 6
    written = [s["x"] for s in samples if s["written_by_oracle"]]
    replies = [
        "".join(
            chat_response_tokens(
                "gpt-4o-mini", [{"role": "user", "content": ""}, {"role": "seed", "content": str(seed)}], 6
            )[0]
        )
        for seed in range(6)
    ]
    assert written and all(any(reply.startswith(x) for reply in replies) for x in written)  # cut server replies
    assert len(set(written)) > 1
    with sqlite3.connect(str(tmp_path / "response_cache.sqlite")) as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == billed  # every paid reply kept
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "chat", *flags[:6], "--oracle-proposal-fraction", "0.5"))
    assert code == 2 and "--oracle-format plain" in err
