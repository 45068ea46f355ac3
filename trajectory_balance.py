"""GFlowNet training objectives as pure functions of log-probabilities and log-rewards.

Trajectory balance (Malkin et al., 2022): for every complete trajectory tau ending in x,
    log Z + sum_t log P_F(s_{t+1} | s_t) = log R(x) + sum_t log P_B(s_t | s_{t+1}).
For autoregressive generation each x has one trajectory, so log P_B = 0 and the loss is
    mean over the batch of (log Z + log P_F(tau) - log R(x))^2.
"""
from __future__ import annotations

import torch


def trajectory_balance_loss(log_z: torch.Tensor, log_pf: torch.Tensor, log_reward: torch.Tensor) -> torch.Tensor:
    """Mean squared TB residual. log_z: scalar (or (B,) for a conditional log Z); log_pf, log_reward: (B,).
    log_reward is treated as a constant target."""
    if log_pf.shape != log_reward.shape:
        raise ValueError(f"log_pf {tuple(log_pf.shape)} and log_reward {tuple(log_reward.shape)} differ in shape")
    residual = log_z + log_pf - log_reward.detach().to(log_pf.dtype)
    return residual.pow(2).mean()


def trajectory_balance_residual(log_z: torch.Tensor, log_pf: torch.Tensor, log_reward: torch.Tensor) -> torch.Tensor:
    """Per-sample residual log Z + log P_F - log R, for logging and diagnostics."""
    return (log_z + log_pf - log_reward).detach()
