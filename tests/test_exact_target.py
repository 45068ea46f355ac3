"""Ground truth for "it samples in proportion to the reward": enumerate every x, compare exact probabilities."""

import contextlib
import io

import pytest
import torch

from evaluation import exact_distribution_metrics
from gflownet_policy import enumerate_sequences
from train import build_parser, train


def test_trained_policy_matches_enumerated_target(word_lm_dirs, tmp_path):
    prior_dir, oracle_dir = word_lm_dirs
    # 4-word vocabulary, 1..5 tokens: 1,364 sequences. Deterministic reward: prior log p(x) from one random
    # GPT-2 plus log p(y* | x) of a fixed target response from another, by teacher forcing.
    args = build_parser().parse_args(
        [
            "--prior-model",
            prior_dir,
            "--oracle",
            "hf",
            "--oracle-model",
            oracle_dir,
            "--target-response",
            "a b",
            "--max-len",
            "5",
            "--batch-size",
            "64",
            "--epochs",
            "1500",
            "--lr",
            "1e-3",
            "--lr-z",
            "0.1",
            "--d-model",
            "32",
            "--num-layers",
            "2",
            "--output-dir",
            str(tmp_path),
            "--save-every",
            "100000",
            "--no-progress",
            "--device",
            "cpu",
            "--seed",
            "0",
        ]
    )
    tokens, lengths = enumerate_sequences(4, 1, 5)
    initial = {}

    def record_initial(policy, reward_model):
        with torch.no_grad():
            initial["metrics"] = exact_distribution_metrics(
                policy.log_pf(tokens, lengths), reward_model(tokens, lengths).log_reward
            )

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


def train_on_the_340_sequence_target(word_lm_dirs, tmp_path, *flags: str) -> tuple[dict, dict]:
    """Train on 4 words, 1..4 tokens (340 sequences, y* = "a b" teacher-forced); (train's result, exact metrics)."""
    prior_dir, oracle_dir = word_lm_dirs
    args = build_parser().parse_args(
        [
            "--prior-model",
            prior_dir,
            "--oracle",
            "hf",
            "--oracle-model",
            oracle_dir,
            "--target-response",
            "a b",
            "--max-len",
            "4",
            "--batch-size",
            "64",
            "--lr-z",
            "0.1",
            "--d-model",
            "32",
            "--num-layers",
            "2",
            "--output-dir",
            str(tmp_path),
            "--save-every",
            "100000",
            "--no-progress",
            "--device",
            "cpu",
            "--seed",
            "0",
            *flags,
        ]
    )
    tokens, lengths = enumerate_sequences(4, 1, 4)
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(args)
    with torch.no_grad():
        policy_log_prob = result["policy"].log_pf(tokens, lengths)
    metrics = exact_distribution_metrics(policy_log_prob, result["reward_model"](tokens, lengths).log_reward)
    assert abs(metrics["policy_mass"] - 1) < 1e-5
    return result, metrics


@pytest.mark.parametrize("policy", ["transformer", "lora"])
@pytest.mark.parametrize("loss", ["tb", "subtb", "modified-subtb", "vargrad"])
def test_every_loss_and_policy_matches_the_enumerated_target(word_lm_dirs, tmp_path, loss, policy):
    # The LoRA policy adapts every linear layer of the prior GPT-2 and decides STOP with its learned stop head
    # (--lora-stop head, the default).
    # SubTB with a LoRA policy also has to learn its flow head from zero: it needs more steps (measured with the
    # stop head: TV 0.0504 after 600 epochs).
    epochs = "800" if (loss, policy) == ("subtb", "lora") else "400"
    flags = ["--policy", policy, "--loss", loss, "--lr", "1e-2" if policy == "lora" else "1e-3", "--epochs", epochs]
    if policy == "lora":
        # lr 1e-2 held constant leaves TB's TV oscillating with the CPU's rounding (0.027-0.071 between epochs 400
        # and 600 on one machine, 0.05 the bound); decayed to 1e-3 it settles (TV 0.010 for tb, 0.026 for subtb)
        flags += ["--lora-target-modules", "c_attn", "c_proj", "c_fc", "--lr-schedule", "cosine"]
    result, metrics = train_on_the_340_sequence_target(word_lm_dirs, tmp_path, *flags)
    assert metrics["tv"] <= 0.05, metrics
    if loss in ("tb", "subtb", "modified-subtb"):  # losses with a learned log Z
        assert abs(result["log_z"]().item() - metrics["true_log_Z"]) < 0.1, metrics


def test_x_written_by_the_oracle_leave_the_target_unchanged(word_lm_dirs, tmp_path):
    """Half of every batch written by the oracle model itself (--oracle-proposal-fraction 0.5): off-policy x, so
    trajectory balance still learns exactly R / Z, not the oracle's own distribution."""
    flags = ["--loss", "tb", "--lr", "1e-3", "--epochs", "400", "--oracle-proposal-fraction", "0.5"]
    result, metrics = train_on_the_340_sequence_target(word_lm_dirs, tmp_path, *flags)
    assert result["reward_model"].proposal_calls == 400 * 32
    assert metrics["tv"] <= 0.05, metrics
    assert abs(result["log_z"]().item() - metrics["true_log_Z"]) < 0.1, metrics
