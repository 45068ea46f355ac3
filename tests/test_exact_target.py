"""Ground truth for "it samples in proportion to the reward": enumerate every x, compare exact probabilities."""
import contextlib
import io

import torch

from evaluation import exact_distribution_metrics
from gflownet_policy import enumerate_sequences
from train import build_parser, train


def test_trained_policy_matches_enumerated_target(word_lm_dirs, tmp_path):
    prior_dir, oracle_dir = word_lm_dirs
    # 4-word vocabulary, 1..5 tokens: 1,364 sequences. Deterministic reward: prior log p(x) from one random
    # GPT-2 plus log p(y* | x) of a fixed target response from another, by teacher forcing.
    args = build_parser().parse_args([
        "--prior-model", prior_dir, "--oracle", "hf", "--oracle-model", oracle_dir, "--target-response", "a b",
        "--max-len", "5", "--batch-size", "64", "--epochs", "1500", "--lr", "1e-3", "--lr-z", "0.1",
        "--d-model", "32", "--num-layers", "2", "--output-dir", str(tmp_path), "--save-every", "100000",
        "--no-progress", "--device", "cpu", "--seed", "0",
    ])
    tokens, lengths = enumerate_sequences(4, 1, 5)
    initial = {}

    def record_initial(policy, reward_model):
        with torch.no_grad():
            initial["metrics"] = exact_distribution_metrics(policy.log_pf(tokens, lengths), reward_model(tokens, lengths).log_reward)

    with contextlib.redirect_stdout(io.StringIO()):
        result = train(args, on_start=record_initial)
    with torch.no_grad():
        policy_log_prob = result["policy"].log_pf(tokens, lengths)
    log_reward = result["reward_model"](tokens, lengths).log_reward
    assert torch.isfinite(log_reward).all()
    metrics = exact_distribution_metrics(policy_log_prob, log_reward)
    assert abs(metrics["policy_mass"] - 1) < 1e-5  # the policy is a distribution over exactly these sequences
    assert initial["metrics"]["tv"] > 0.3, initial  # the untrained policy is far from the target
    assert metrics["tv"] <= 0.05, metrics
    assert abs(result["log_z"]().item() - metrics["true_log_Z"]) < 0.1, metrics
