"""Sample N inputs from a trained GFlowNet checkpoint, write them as JSONL with a summary of the metrics in
evaluation.py (and, with --score, their rewards at the oracle's cost). Tasks with their own evaluation (the
contradiction task) get theirs.

  python sample.py --checkpoint out/checkpoint_gfn_raw_epoch500.pt --num-samples 256 [--score]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from build import GenericTask, build_policy_for_checkpoint, build_reward_model, load_prior, task_plugin
from checkpoint import load_checkpoint
from durable_files import atomic_write
from errors import OneLineErrorParser, UserError, run_cli
from evaluation import batch_metrics, sample_metrics
from hf_models import resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description="Sample inputs from a trained GFlowNet checkpoint and summarise them.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint_gfn_*.pt file")
    parser.add_argument(
        "--task", default=None, help="optional check: the task the checkpoint must have been trained on"
    )
    parser.add_argument("--samples-per-subject", type=int, default=16, help="contradiction task: questions per example")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--score",
        action="store_true",
        help="also score the samples with the checkpoint's prior and oracle (oracle calls cost money)",
    )
    parser.add_argument("--output", default=None, help="JSONL of samples (default: next to the checkpoint)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
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
    task = task_plugin(run_args.task)
    if task is not GenericTask:  # a task with its own evaluation (the contradiction task)
        return task.evaluate_checkpoint(args, state, run_args, prior_model, tokenizer, policy, device)
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
                record.update(
                    response=rewards.oracle_results[i].response,
                    log_prior=float(rewards.log_prior[i]),
                    log_likelihood=float(rewards.log_likelihood[i]),
                    log_reward=float(rewards.log_reward[i]),
                    valid=bool(rewards.valid[i]),
                )
            records.append(record)
        all_log_pf.append(log_pf)
        all_log_q.append(log_q.cpu())
        if rewards is not None:
            all_log_r.append(rewards.log_reward)
        remaining -= n
    log_pf, log_q = torch.cat(all_log_pf), torch.cat(all_log_q)
    summary = {
        "checkpoint": args.checkpoint,
        "epoch": state["epoch"],
        "num_samples": len(records),
        "log_pf_mean": float(log_pf.mean()),
        **sample_metrics([r["text"] for r in records], token_lists),
    }
    if all_log_r:
        log_reward = torch.cat(all_log_r)
        valid = torch.isfinite(log_reward)
        summary.update(
            log_reward_mean=float(log_reward[valid].mean()),
            num_invalid=int((~valid).sum()),
            **(batch_metrics(log_reward[valid], log_pf[valid], log_q[valid]) if valid.any() else {}),
        )
    output = args.output or os.path.splitext(args.checkpoint)[0] + "_samples.jsonl"
    lines = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(output, lambda f: f.write(lines.encode()))
    atomic_write(
        os.path.splitext(output)[0] + "_summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode())
    )
    summary["output"] = output
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: print(json.dumps(evaluate_checkpoint(args), indent=2)))


if __name__ == "__main__":
    sys.exit(main())
