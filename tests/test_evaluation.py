import pytest
import torch

from evaluation import (
    batch_metrics,
    distinct_n,
    effective_sample_size,
    exact_distribution_metrics,
    importance_log_z,
    kl_reverse_estimate,
    unique_fraction,
)


def test_distinct_and_unique_by_hand():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)  # (1,2) twice, (2,3), (2,4)
    assert distinct_n([[5]], 2) == 0.0
    assert unique_fraction(["a", "b", "a", "c"]) == 0.75


def test_estimators_on_a_known_categorical():
    # pi and R over 4 outcomes; draw many on-policy samples and compare with the exact KL and log Z.
    torch.manual_seed(0)
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    log_r = torch.log(torch.tensor([2.0, 1.0, 3.0, 6.0], dtype=torch.float64))
    true_log_z = torch.logsumexp(log_r, 0).item()
    target = (log_r - true_log_z).exp()
    exact_kl = (pi * (pi.log() - target.log())).sum().item()
    idx = torch.multinomial(pi, 200_000, replacement=True)
    log_pf, log_reward = pi.log()[idx], log_r[idx]
    assert importance_log_z(log_reward, log_pf) == pytest.approx(true_log_z, abs=0.01)
    assert kl_reverse_estimate(log_reward, log_pf) == pytest.approx(exact_kl, abs=0.01)
    # off-policy: samples from a uniform q, weighted back to pi
    q = torch.full((4,), 0.25, dtype=torch.float64)
    idx = torch.multinomial(q, 200_000, replacement=True)
    assert kl_reverse_estimate(log_r[idx], pi.log()[idx], q.log()[idx]) == pytest.approx(exact_kl, abs=0.02)
    exact = exact_distribution_metrics(pi.log(), log_r)
    assert exact["kl_policy_target"] == pytest.approx(exact_kl)
    assert exact["tv"] == pytest.approx(0.5 * (pi - target).abs().sum().item())


def test_ess_is_one_when_proposal_matches_target_and_small_when_one_sample_dominates():
    log_q = torch.tensor([-1.0, -2.0, -3.0])
    assert effective_sample_size(log_q + 5.0, log_q) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([0.0, -50.0, -50.0]), torch.zeros(3)) == pytest.approx(1 / 3, abs=1e-6)
    metrics = batch_metrics(log_q + 5.0, log_q)
    assert metrics["kl_reverse"] == pytest.approx(0.0, abs=1e-9) and metrics["var_log_r_minus_log_pf"] == pytest.approx(
        0.0
    )
    assert metrics["log_Z_importance"] == pytest.approx(5.0)
