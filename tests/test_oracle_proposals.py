"""--oracle-proposal-fraction: x written by the local oracle itself, as off-policy exploration proposals."""

import pytest
import torch
from cli_helpers import read_jsonl, run_main, tiny_flags

from hf_models import document_start_id, load_causal_lm
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
    with pytest.raises(ValueError, match="local Hugging Face oracle"):
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
        (["--oracle", "openai", "--model", "m"], "needs a local oracle"),
        (["--prefetch"], "synchronous batches"),
        (["--llm-weight", "0"], "needs a local oracle"),
    ):
        code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "bad", "--oracle-proposal-fraction", "0.5", *bad))
        assert code == 2 and message in err and "Traceback" not in err, err
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "bad", "--oracle-proposal-fraction", "1.5"))
    assert code == 2 and "must be in [0, 1]" in err
