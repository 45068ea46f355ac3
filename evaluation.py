"""Metrics for a GFlowNet sampler: estimators and diversity measures, a leaf module (no project imports).

Estimators (all from one batch; x_i drawn from the sampler q, which is the policy pi itself when
temperature == 1 and epsilon == 0):
  log Z_hat    = log mean_i exp(log R(x_i) - log q(x_i))           importance-sampled partition function
  kl_reverse   = E_pi[log pi(x) - log R(x)] + log Z_hat             KL(pi || R/Z); E_pi is a self-normalised
                 importance average with weights pi/q (uniform when q = pi). log Z_hat is biased low for
                 small batches, so kl_reverse is biased low too; it is exactly 0 when pi is proportional to R.
  ess          = (sum w)^2 / (N sum w^2), w = R/q: 1 when q matches the target, 1/N when one sample dominates.

The command that samples N inputs from a checkpoint and reports these metrics is sample.py; `python evaluation.py`
runs it too:
  python evaluation.py --checkpoint out/checkpoint_gfn_raw_epoch500.pt --num-samples 256 [--score]
"""

from __future__ import annotations

import math
import sys

import torch


def log_mean_exp(values: torch.Tensor) -> float:
    values = values.double()
    return float(torch.logsumexp(values, dim=0) - math.log(values.numel()))


def importance_log_z(log_reward: torch.Tensor, log_q: torch.Tensor) -> float:
    return log_mean_exp(log_reward.double() - log_q.double())


def kl_reverse_estimate(log_reward: torch.Tensor, log_pf: torch.Tensor, log_q: torch.Tensor | None = None) -> float:
    log_q = log_pf if log_q is None else log_q
    log_pf, log_reward, log_q = log_pf.double(), log_reward.double(), log_q.double()
    weights = torch.softmax(log_pf - log_q, dim=0)  # self-normalised pi/q
    return float((weights * (log_pf - log_reward)).sum()) + importance_log_z(log_reward, log_q)


def effective_sample_size(log_reward: torch.Tensor, log_q: torch.Tensor) -> float:
    log_w = log_reward.double() - log_q.double()
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)) / log_w.numel())


def unique_fraction(items: list) -> float:
    return len(set(map(str, items))) / max(len(items), 1)


def distinct_n(token_lists: list[list[int]], n: int = 2) -> float:
    """Distinct n-grams over all n-grams in the batch (Li et al., 2016)."""
    ngrams = [tuple(tokens[i : i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def sample_metrics(texts: list[str], token_lists: list[list[int]]) -> dict:
    return {"unique_fraction": unique_fraction(texts), "distinct_2": distinct_n(token_lists, 2)}


def batch_metrics(log_reward: torch.Tensor, log_pf: torch.Tensor, log_q: torch.Tensor | None = None) -> dict:
    """Distribution-matching diagnostics of one batch (see the module docstring)."""
    log_q = log_pf if log_q is None else log_q
    return {
        "kl_reverse": kl_reverse_estimate(log_reward, log_pf, log_q),
        "log_Z_importance": importance_log_z(log_reward, log_q),
        "var_log_r_minus_log_pf": float((log_reward.double() - log_pf.double()).var(unbiased=False)),
        "ess_fraction": effective_sample_size(log_reward, log_q),
    }


def exact_distribution_metrics(
    policy_log_prob: torch.Tensor, log_reward: torch.Tensor, modes: torch.Tensor | None = None
) -> dict:
    """Against an enumerated target: policy_log_prob and log_reward over *every* x.
    Total variation is reported as half the L1 distance (in [0, 1]); tv_sum is the full L1 sum. With `modes`
    (indices of x), modes_found counts those the policy gives at least half their target probability."""
    log_p = policy_log_prob.double()
    true_log_z = torch.logsumexp(log_reward.double(), 0)
    log_target = log_reward.double() - true_log_z
    p, target = log_p.exp(), log_target.exp()
    found = {}
    if modes is not None:
        found = {
            "modes_found": int((p[modes] >= 0.5 * target[modes]).sum()),
            "modes_policy_mass": float(p[modes].sum()),
            "modes_target_mass": float(target[modes].sum()),
        }
    return {
        **found,
        "tv": 0.5 * float((p - target).abs().sum()),
        "tv_sum": float((p - target).abs().sum()),
        "kl_policy_target": float((p * (log_p - log_target)).sum()),
        "kl_target_policy": float((target * (log_target - log_p)).sum()),
        "true_log_Z": float(true_log_z),
        "policy_mass": float(p.sum()),
    }


if __name__ == "__main__":  # a leaf imports no project module, not even here: the command is sample.py
    print("error: evaluation.py holds the metrics; sample a checkpoint with: python sample.py --checkpoint PATH ...")
    sys.exit(2)
