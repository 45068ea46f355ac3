import torch

from trajectory_balance import trajectory_balance_loss


def naive_tb_loss(log_z: float, log_pf_steps: list[list[float]], log_reward: list[float]) -> float:
    """Float64 reference: sum each trajectory's per-step log-probabilities in a Python loop."""
    total = 0.0
    for steps, log_r in zip(log_pf_steps, log_reward):
        residual = log_z
        for lp in steps:
            residual += lp
        residual -= log_r
        total += residual * residual
    return total / len(log_reward)


def test_tb_loss_matches_naive_float64_reference():
    generator = torch.Generator().manual_seed(0)
    steps = [(-torch.rand(int(n), generator=generator, dtype=torch.float64) * 5).tolist()
             for n in torch.randint(1, 9, (16,), generator=generator)]
    log_reward = (torch.randn(16, generator=generator, dtype=torch.float64) * 20 - 30).tolist()
    log_z = 3.7
    expected = naive_tb_loss(log_z, steps, log_reward)
    log_pf = torch.tensor([sum(s) for s in steps], dtype=torch.float32)
    got = trajectory_balance_loss(torch.tensor(log_z), log_pf, torch.tensor(log_reward, dtype=torch.float32))
    assert abs(got.item() - expected) / expected < 1e-5


def test_tb_gradients_match_analytic_form():
    log_z = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    log_pf = torch.tensor([-3.0, -1.0, -2.5], dtype=torch.float64, requires_grad=True)
    log_reward = torch.tensor([-2.0, -4.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss = trajectory_balance_loss(log_z, log_pf, log_reward)
    loss.backward()
    residual = (0.5 + log_pf - log_reward).detach()
    assert torch.allclose(log_pf.grad, 2 * residual / 3)
    assert torch.allclose(log_z.grad, (2 * residual / 3).sum())
    assert log_reward.grad is None  # the reward is a target, not something to move


def test_tb_loss_rejects_mismatched_shapes():
    import pytest

    with pytest.raises(ValueError):
        trajectory_balance_loss(torch.tensor(0.0), torch.zeros(3), torch.zeros(4))
