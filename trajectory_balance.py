"""GFlowNet training objectives as pure functions of log-probabilities and log-rewards.

Trajectory balance (Malkin et al., 2022): for every complete trajectory tau ending in x,
    log Z + sum_t log P_F(s_{t+1} | s_t) = log R(x) + sum_t log P_B(s_t | s_{t+1}).
For autoregressive generation each x has one trajectory, so log P_B = 0 and the loss is
    mean over the batch of (log Z + log P_F(tau) - log R(x))^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def trajectory_balance_loss(log_z: torch.Tensor, log_pf: torch.Tensor, log_reward: torch.Tensor) -> torch.Tensor:
    """Mean squared TB residual. log_z: scalar (or (B,) for a conditional log Z); log_pf, log_reward: (B,).
    log_reward is treated as a constant target."""
    if log_pf.shape != log_reward.shape:
        raise ValueError(f"log_pf {tuple(log_pf.shape)} and log_reward {tuple(log_reward.shape)} differ in shape")
    residual = log_z + log_pf - log_reward.detach().to(log_pf.dtype)
    return residual.pow(2).mean()


# ---------------------------------------------------------------------------------------------
# Sub-trajectory objectives.
#
# Shared conventions: a batch of B sequences, sequence b has n_b = lengths[b] tokens,
# 1 <= n_b <= L = max_len. Its trajectory is s_0 (empty prefix) -> s_1 -> ... -> s_n -> s_f, i.e.
# n token actions then STOP. `log_pf_steps` is (B, L + 1): column t (0 <= t <= n_b) is log P_F of the
# action taken from prefix s_t (a token for t < n_b, STOP at t == n_b), as returned by
# `GFlowNetPolicy.log_pf_per_step`. Columns past a sequence's last action are padding and are never
# read (they may hold anything, including nan/inf). Autoregressive generation gives every state a
# single parent, so log P_B = 0 throughout.
# ---------------------------------------------------------------------------------------------


def _check_steps(name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    if tensor.shape != like.shape:
        raise ValueError(f"{name} {tuple(tensor.shape)} must have the shape of log_pf_steps {tuple(like.shape)}")


def _check_lengths(lengths: torch.Tensor, batch: int, low: int, high: int) -> None:
    if lengths.shape != (batch,):
        raise ValueError(f"lengths {tuple(lengths.shape)} must have shape ({batch},)")
    # One host sync; worth it, since an out-of-range length silently reads padding as real actions.
    if batch and not bool(((lengths >= low) & (lengths <= high)).all()):
        raise ValueError(f"lengths must lie in [{low}, {high}], got min {int(lengths.min())} max {int(lengths.max())}")


def _prefix_log_pf(log_pf_steps: torch.Tensor, valid: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) cumulative log P_F of the first t actions, C[:, t] = sum_{k<t} log_pf_steps[:, k].
    Columns outside `valid` are zeroed first (torch.where, so nan/inf padding cannot leak in, not even
    through the gradient)."""
    steps = torch.where(valid, log_pf_steps, torch.zeros_like(log_pf_steps))
    cumulative = torch.cumsum(steps, dim=1)
    zero = torch.zeros_like(cumulative[:, :1])
    out = torch.cat([zero, cumulative], dim=1)  # (B, L + 2): C_0 = 0, C_t for t = 1..L+1
    return out[:, :width]


def subtb_loss(
    log_pf_steps: torch.Tensor,
    log_flows: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    lam: float = 1.0,
    log_z: torch.Tensor | None = None,
) -> torch.Tensor:
    """SubTB(lambda) loss (Madan et al., 2023, "Learning GFlowNets from partial episodes for improved
    convergence and stability", eqs. 9-10), specialised to autoregressive generation (log P_B = 0).

    States of trajectory b are s_0, ..., s_n (n = lengths[b]) and the terminal s_{n+1} = s_f. Flows:
        log F(s_t) = log_flows[b, t]            for 0 <= t <= n  (log_z[b] replaces t = 0 if given),
        log F(s_{n+1}) = log_reward[b]          (the terminal flow is the reward).
    For every pair 0 <= i < j <= n + 1,
        residual_ij = log F(s_i) + sum_{t=i}^{j-1} log_pf_steps[b, t] - log F(s_j),
    and the per-trajectory loss is
        L_b = sum_{i<j} lam^(j-i) residual_ij^2 / sum_{i<j} lam^(j-i).
    The returned loss is mean_b L_b. lam -> infinity keeps only the longest pair (0, n + 1), which is
    trajectory balance with log Z = log F(s_0); lam -> 0 keeps only one-step (detailed-balance) pairs.

    Args:
        log_pf_steps: (B, L + 1) per-action log P_F; columns > lengths[b] are ignored.
        log_flows: (B, L + 1) learned log F(s_t); columns > lengths[b] are ignored.
        log_reward: (B,) log R(x); a constant target (detached, as in `trajectory_balance_loss`).
        lengths: (B,) integer lengths, 1 <= lengths[b] <= L.
        lam: lambda > 0, the geometric weight per sub-trajectory step.
        log_z: optional scalar or (B,) log Z replacing log F(s_0).

    Returns a scalar of log_pf_steps' dtype. Memory is O(B * L^2).
    """
    if log_pf_steps.dim() != 2:
        raise ValueError(f"log_pf_steps must be (B, L + 1), got {tuple(log_pf_steps.shape)}")
    _check_steps("log_flows", log_flows, log_pf_steps)
    batch, width = log_pf_steps.shape
    if log_reward.shape != (batch,):
        raise ValueError(f"log_reward {tuple(log_reward.shape)} must have shape ({batch},)")
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite positive number, got {lam}")
    _check_lengths(lengths, batch, 1, width - 1)
    dtype, device = log_pf_steps.dtype, log_pf_steps.device
    lengths = lengths.to(device=device, dtype=torch.long).unsqueeze(1)  # (B, 1)

    # Extended state axis t = 0..L+1 (one extra column so s_{n+1} exists even when n = L).
    t = torch.arange(width + 1, device=device).unsqueeze(0)  # (1, L + 2)
    flows = log_flows.to(dtype)
    if log_z is not None:
        flows = torch.cat([log_z.to(dtype).reshape(-1).expand(batch).unsqueeze(1), flows[:, 1:]], dim=1)
    flows = torch.cat([flows, torch.zeros_like(flows[:, :1])], dim=1)
    terminal = log_reward.detach().to(dtype).unsqueeze(1).expand(-1, width + 1)
    flows = torch.where(t <= lengths, flows, torch.where(t == lengths + 1, terminal, torch.zeros_like(flows)))

    # residual_ij = (log F_i - C_i) - (log F_j - C_j) with C the prefix sums of log P_F, so every pair
    # comes from one (B, L+2, L+2) broadcast instead of a loop over sub-trajectories.
    potential = flows - _prefix_log_pf(log_pf_steps, t[:, :width] <= lengths, width + 1)
    residual = potential.unsqueeze(2) - potential.unsqueeze(1)  # [b, i, j]

    i = t.reshape(1, -1, 1)
    j = t.reshape(1, 1, -1)
    pair = (i < j) & (j <= (lengths + 1).unsqueeze(2))  # (B, L+2, L+2); never empty: (0, n+1) is valid
    # Normalised lam^(j-i) weights as a masked softmax of (j-i) log lam: no overflow for large lam or L.
    log_weight = ((j - i).to(dtype) * math.log(lam)).expand_as(pair)
    log_weight = log_weight.masked_fill(~pair, float("-inf"))
    weight = torch.softmax(log_weight.reshape(batch, -1), dim=1).reshape_as(pair)
    # Mask before squaring: pow's backward multiplies by the residual, so a non-finite one would leak nan.
    squared = torch.where(pair, residual, torch.zeros_like(residual)).pow(2)
    return (weight * squared).sum(dim=(1, 2)).mean()


def modified_subtb_loss(
    log_pf_steps: torch.Tensor,
    log_stop: torch.Tensor,
    prefix_log_reward: torch.Tensor,
    lengths: torch.Tensor,
    min_len: int = 1,
    log_z: torch.Tensor | None = None,
) -> torch.Tensor:
    """Modified SubTB loss of Hu et al. (2024), "Amortizing intractable inference in large language
    models", eq. 9: every prefix s_t with min_len <= t may terminate, with reward R(s_t T).

    For each trajectory b (n = lengths[b]) and each pair min_len <= i < j <= n,
        residual_ij = [log R(s_i T) - log P_F(T | s_i)] + sum_{t=i}^{j-1} log P_F(s_{t+1} | s_t)
                      - [log R(s_j T) - log P_F(T | s_j)],
    where, since j <= n, every log_pf_steps[b, t] in the sum is a token action (never the STOP at t = n).
    The per-trajectory loss is the uniform mean of residual_ij^2 over its valid pairs; trajectories with
    no pair (n == min_len) are excluded and the batch loss is the mean over the remaining ones. If no
    trajectory has a pair, a zero connected to the inputs' graph is returned.

    At the global optimum (all residuals zero for all trajectories), log R(s_t T) - log P_F(T | s_t)
    - log P_F(s_t) is the same constant for every prefix, i.e. P_F(x T) = P_F(x) P_F(T | x) is proportional
    to R(x T) for every x with min_len <= |x| <= max_len. Sequences of length exactly max_len are no
    exception: STOP is forced there, so log_stop[:, max_len] must be 0 (log 1), as the policy's masking
    gives, and the same identity P_F(x T) = P_F(x), proportional to R(x T), holds.

    Args:
        log_pf_steps: (B, L + 1) per-action log P_F (column t: action taken from s_t).
        log_stop: (B, L + 1) log P_F(STOP | s_t) for every t; only min_len <= t <= lengths[b] is read,
            so -inf below min_len and padding are harmless.
        prefix_log_reward: (B, L + 1) log R(s_t T); a constant target (detached). Same columns read.
        lengths: (B,) integer lengths, min_len <= lengths[b] <= L.
        min_len: the shortest length that may terminate (>= 1).

    log_z: when given (scalar or (B,)), the root s_0 joins as a start state with log F(s_0) = log Z, adding the
        pairs (0, j) for min_len <= j <= n. Without it, no pair contains the first action, so with min_len >= 1
        the distribution of the first token is never trained (the exact-target test fails); the training
        loop always passes it.

    Returns a scalar of log_pf_steps' dtype. Memory is O(B * L^2).
    """
    if log_pf_steps.dim() != 2:
        raise ValueError(f"log_pf_steps must be (B, L + 1), got {tuple(log_pf_steps.shape)}")
    _check_steps("log_stop", log_stop, log_pf_steps)
    _check_steps("prefix_log_reward", prefix_log_reward, log_pf_steps)
    batch, width = log_pf_steps.shape
    if not 1 <= min_len <= width - 1:
        raise ValueError(f"need 1 <= min_len <= L = {width - 1}, got {min_len}")
    _check_lengths(lengths, batch, min_len, width - 1)
    dtype, device = log_pf_steps.dtype, log_pf_steps.device
    lengths = lengths.to(device=device, dtype=torch.long).unsqueeze(1)  # (B, 1)

    t = torch.arange(width, device=device).unsqueeze(0)  # (1, L + 1)
    terminable = (t >= min_len) & (t <= lengths)
    # Only token actions t < n enter any sum (pairs end at j <= n), so the STOP column is masked too.
    prefix = _prefix_log_pf(log_pf_steps, t < lengths, width)
    target = prefix_log_reward.detach().to(dtype) - log_stop.to(dtype) - prefix
    # residual_ij = potential_i - potential_j; masked with where so -inf/nan outside the range stay out.
    potential = torch.where(terminable, target, torch.zeros_like(target))
    if log_z is not None:  # the root's potential is log Z - (empty prefix log P_F = 0)
        root = log_z.to(dtype).expand(batch).unsqueeze(1)
        potential = torch.cat([root, potential[:, 1:]], dim=1)
    residual = potential.unsqueeze(2) - potential.unsqueeze(1)  # [b, i, j]

    i = t.reshape(1, -1, 1)
    j = t.reshape(1, 1, -1)
    start = (i >= min_len) | ((i == 0) if log_z is not None else torch.zeros_like(i, dtype=torch.bool))
    pair = start & (i < j) & (j >= min_len) & (j <= lengths.unsqueeze(2))
    # Mask before squaring: pow's backward multiplies by the residual, so a non-finite one would leak nan.
    squared = torch.where(pair, residual, torch.zeros_like(residual)).pow(2)
    num_pairs = pair.sum(dim=(1, 2))  # m (m - 1) / 2 with m = n - min_len + 1
    has_pair = num_pairs > 0
    per_trajectory = squared.sum(dim=(1, 2)) / num_pairs.clamp(min=1).to(dtype)
    num_trajectories = has_pair.sum().clamp(min=1).to(dtype)
    # Trajectories without a pair contribute an exact 0 (their squared sum is 0), so dividing by the
    # count of those with a pair is the mean over them; with none, this is a 0 that keeps a grad_fn.
    return per_trajectory.sum() / num_trajectories


def vargrad_loss(log_pf: torch.Tensor, log_reward: torch.Tensor) -> torch.Tensor:
    """Log-variance (VarGrad) loss (Richter et al., 2020, "VarGrad: a low-variance gradient estimator
    for variational inference"; Zhang et al., 2023, "Robust scheduling with GFlowNets"): trajectory
    balance with log Z replaced by its batch estimate. With r_b = log P_F(tau_b) - log R(x_b),
        loss = mean_b (r_b - mean(r))^2,
    the population variance of the residuals. It is invariant to a constant shift of log R and zero iff
    all residuals are equal, i.e. P_F proportional to R on the batch. log_pf, log_reward: (B,), B >= 2;
    log_reward is a constant target (detached)."""
    if log_pf.dim() != 1 or log_pf.shape != log_reward.shape:
        raise ValueError(f"log_pf {tuple(log_pf.shape)} and log_reward {tuple(log_reward.shape)} must be equal (B,)")
    if log_pf.shape[0] < 2:
        raise ValueError(f"vargrad_loss needs a batch of at least 2, got {log_pf.shape[0]}")
    residual = log_pf - log_reward.detach().to(log_pf.dtype)
    return (residual - residual.mean()).pow(2).mean()


def vargrad_log_z(log_pf: torch.Tensor, log_reward: torch.Tensor) -> float:
    """The log Z implied by the batch, mean_b(log R(x_b) - log P_F(tau_b)), detached, for logging."""
    if log_pf.shape != log_reward.shape:
        raise ValueError(f"log_pf {tuple(log_pf.shape)} and log_reward {tuple(log_reward.shape)} differ in shape")
    return float((log_reward.detach() - log_pf.detach().to(log_reward.dtype)).mean())


LOSSES = ("tb", "subtb", "modified-subtb", "vargrad")


@dataclass(frozen=True)
class Objective:
    """What the training loop needs to know about a loss, asked rather than inferred from its name."""

    name: str
    needs_prefix_rewards: bool  # log R of every prefix of x (modified SubTB), scored by the reward
    learned_log_z: bool  # True: log the learned log Z; False: the batch's implied one (VarGrad has none)


OBJECTIVES = {
    "tb": Objective("tb", needs_prefix_rewards=False, learned_log_z=True),
    "subtb": Objective("subtb", needs_prefix_rewards=False, learned_log_z=True),
    "modified-subtb": Objective("modified-subtb", needs_prefix_rewards=True, learned_log_z=True),
    "vargrad": Objective("vargrad", needs_prefix_rewards=False, learned_log_z=False),
}


def gflownet_loss(
    name: str,
    outputs,
    log_z: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    subtb_lambda: float = 1.0,
    prefix_log_reward: torch.Tensor | None = None,
    min_len: int = 1,
) -> torch.Tensor:
    """Dispatch by name. `outputs` is a gflownet_policy.PolicyOutputs from one teacher-forced pass."""
    if name == "tb":
        return trajectory_balance_loss(log_z, outputs.log_pf, log_reward)
    if name == "subtb":
        # log Z is the flow of the initial state s_0; the flow head gives every other state's.
        return subtb_loss(outputs.log_pf_steps, outputs.log_flows, log_reward, lengths, lam=subtb_lambda, log_z=log_z)
    if name == "modified-subtb":
        if prefix_log_reward is None:
            raise ValueError("modified-subtb needs prefix_log_reward")
        return modified_subtb_loss(
            outputs.log_pf_steps, outputs.log_stop, prefix_log_reward, lengths, min_len=min_len, log_z=log_z
        )
    if name == "vargrad":
        return vargrad_loss(outputs.log_pf, log_reward)
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
