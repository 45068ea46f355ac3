"""Metrics for a GFlowNet sampler, and a command that samples N inputs from a checkpoint.

Estimators (all from one batch; x_i drawn from the sampler q, which is the policy pi itself when
temperature == 1 and epsilon == 0):
  log Z_hat    = log mean_i exp(log R(x_i) - log q(x_i))           importance-sampled partition function
  kl_reverse   = E_pi[log pi(x) - log R(x)] + log Z_hat             KL(pi || R/Z); E_pi is a self-normalised
                 importance average with weights pi/q (uniform when q = pi). log Z_hat is biased low for
                 small batches, so kl_reverse is biased low too; it is exactly 0 when pi is proportional to R.
  ess          = (sum w)^2 / (N sum w^2), w = R/q: 1 when q matches the target, 1/N when one sample dominates.

Usage:
  python evaluation.py --checkpoint out/checkpoint_gfn_raw_epoch500.pt --num-samples 256 [--score]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from errors import UserError


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
    ngrams = [tuple(tokens[i:i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
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


def exact_distribution_metrics(policy_log_prob: torch.Tensor, log_reward: torch.Tensor) -> dict:
    """Against an enumerated target: policy_log_prob and log_reward over *every* x.
    Total variation is reported as half the L1 distance (in [0, 1]); tv_sum is the full L1 sum."""
    log_p = policy_log_prob.double()
    true_log_z = torch.logsumexp(log_reward.double(), 0)
    log_target = log_reward.double() - true_log_z
    p, target = log_p.exp(), log_target.exp()
    return {
        "tv": 0.5 * float((p - target).abs().sum()),
        "tv_sum": float((p - target).abs().sum()),
        "kl_policy_target": float((p * (log_p - log_target)).sum()),
        "kl_target_policy": float((target * (log_target - log_p)).sum()),
        "true_log_Z": float(true_log_z),
        "policy_mass": float(p.sum()),
    }


# ----------------------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    from errors import OneLineErrorParser

    parser = OneLineErrorParser(description="Sample inputs from a trained GFlowNet checkpoint and summarise them.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint_gfn_*.pt file")
    parser.add_argument("--task", default=None, help="optional check: the task the checkpoint must have been trained on")
    parser.add_argument("--samples-per-subject", type=int, default=16, help="contradiction task: questions per example")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--score", action="store_true",
                        help="also score the samples with the checkpoint's prior and oracle (oracle calls cost money)")
    parser.add_argument("--output", default=None, help="JSONL of samples (default: next to the checkpoint)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    from checkpoint import load_checkpoint
    from durable_files import atomic_write
    from train import build_reward_model, build_policy_for_checkpoint, load_prior
    from hf_models import resolve_device

    if args.num_samples < 1 or args.batch_size < 1:
        raise UserError("--num-samples and --batch-size must be >= 1")
    state = load_checkpoint(args.checkpoint)
    run_args = argparse.Namespace(**state["args"])
    if args.task is not None and args.task != run_args.task:
        raise UserError(f"{args.checkpoint} was trained on --task {run_args.task}, not {args.task}")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    prior_model, tokenizer = load_prior(run_args, device)
    policy = build_policy_for_checkpoint(state, prior_model, tokenizer, device)
    if run_args.task == "contradiction":
        import contradiction_task

        reward = contradiction_task.build_reward(run_args, prior_model, tokenizer, device)
        output = args.output or os.path.splitext(args.checkpoint)[0] + "_questions.jsonl"
        summary = contradiction_task.evaluate(state, policy, tokenizer, reward, args.samples_per_subject, output)
        print(contradiction_task.format_table(summary), file=sys.stderr)
        return summary
    reward_model = build_reward_model(run_args, prior_model, tokenizer, device, with_oracle=args.score)
    records, all_log_pf, all_log_q, all_log_r, token_lists = [], [], [], [], []
    remaining = args.num_samples
    while remaining > 0:
        n = min(args.batch_size, remaining)
        tokens, lengths, log_q = policy.sample(n, temperature=args.temperature)
        with torch.no_grad():
            log_pf = policy.log_pf(tokens, lengths).cpu()
        texts = reward_model.decode(tokens, lengths)
        rewards = reward_model(tokens, lengths, texts) if args.score else None
        for i, text in enumerate(texts):
            ids = tokens[i, : int(lengths[i])].tolist()
            token_lists.append(ids)
            record = {"text": text, "token_ids": ids, "log_pf": float(log_pf[i])}
            if rewards is not None:
                record.update(response=rewards.oracle_results[i].response, log_prior=float(rewards.log_prior[i]),
                              log_likelihood=float(rewards.log_likelihood[i]), log_reward=float(rewards.log_reward[i]),
                              valid=bool(rewards.valid[i]))
            records.append(record)
        all_log_pf.append(log_pf)
        all_log_q.append(log_q.cpu())
        if rewards is not None:
            all_log_r.append(rewards.log_reward)
        remaining -= n
    log_pf, log_q = torch.cat(all_log_pf), torch.cat(all_log_q)
    summary = {"checkpoint": args.checkpoint, "epoch": state["epoch"], "num_samples": len(records),
               "log_pf_mean": float(log_pf.mean()), **sample_metrics([r["text"] for r in records], token_lists)}
    if all_log_r:
        log_reward = torch.cat(all_log_r)
        valid = torch.isfinite(log_reward)
        summary.update(log_reward_mean=float(log_reward[valid].mean()), num_invalid=int((~valid).sum()),
                       **(batch_metrics(log_reward[valid], log_pf[valid], log_q[valid]) if valid.any() else {}))
    output = args.output or os.path.splitext(args.checkpoint)[0] + "_samples.jsonl"
    lines = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(output, lambda f: f.write(lines.encode()))
    atomic_write(os.path.splitext(output)[0] + "_summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
    summary["output"] = output
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = evaluate_checkpoint(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
