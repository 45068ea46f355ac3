"""What a run writes and shows: one record per scored sample (the samples file), the metrics of each step (the
metrics file, W&B, the progress bar or one JSON line an epoch) and one-line reports of skipped samples. Only rank
0 writes under torchrun."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

import distributed
from durable_files import JsonlAppender, NullAppender, atomic_write
from evaluation import batch_metrics, sample_metrics
from trajectory_balance import vargrad_log_z


class Outputs:
    """What a run writes: samples and metrics JSONL (rank 0 only), W&B, the progress bar or one line an epoch."""

    def __init__(
        self, args: argparse.Namespace, dist_info: distributed.DistInfo, start_epoch: int, run_id: str = ""
    ) -> None:
        os.makedirs(args.output_dir, exist_ok=True)
        main = dist_info.is_main
        if main:
            write_run_settings(args, run_id)
        self.samples = (
            JsonlAppender(os.path.join(args.output_dir, f"samples_{args.task}.jsonl")) if main else NullAppender()
        )
        self.metrics = (
            JsonlAppender(os.path.join(args.output_dir, f"metrics_{args.task}.jsonl"), fsync=False)
            if main
            else NullAppender()
        )
        self.wandb = init_wandb(args) if main else None
        self.progress = None
        self.quiet = not main
        if not args.no_progress and main:
            from tqdm import tqdm  # lazily: only with a progress bar

            self.progress = tqdm(total=args.epochs, initial=start_epoch, desc=f"gfn {args.task}", dynamic_ncols=True)

    def line(self, message: str) -> None:
        if not self.quiet:
            (self.progress.write if self.progress is not None else lambda m: print(m, file=sys.stderr))(message)

    def log(self, metrics: dict, postfix: dict) -> None:
        self.metrics.write([metrics])
        if self.wandb is not None:
            self.wandb.log(metrics, step=metrics["epoch"])
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(postfix)
        elif not self.quiet:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.samples.close()
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


SETTINGS_FORMAT = "dataset-sucker-run/1"


def settings_path(output_dir: str, task: str) -> str:
    return os.path.join(output_dir, f"run_{task}.json")


def write_run_settings(args: argparse.Namespace, run_id: str) -> None:
    """run_{task}.json: the run's flags and id, rewritten at every (re)start, so that what the samples file holds can
    be traced to the oracle, model and settings that produced it (resurrect.py) without loading a checkpoint.
    vars(args) never holds the API key: the oracle reads it from the environment."""
    settings = {
        "format": SETTINGS_FORMAT,
        "run_id": run_id,
        "task": args.task,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
    }
    text = json.dumps(settings, indent=1, ensure_ascii=False) + "\n"
    atomic_write(settings_path(args.output_dir, args.task), lambda f: f.write(text.encode("utf-8")))


def init_wandb(args: argparse.Namespace):
    mode = args.wandb_mode or ("online" if args.wandb_project else "disabled")
    if mode == "disabled":
        return None
    import wandb  # lazily: slow to import, and only needed when logging to W&B

    # vars(args) never holds the API key: it is read from the environment by the oracle alone.
    return wandb.init(
        project=args.wandb_project or "dataset-sucker",
        mode=mode,
        config=vars(args),
        dir=args.output_dir,
        name=f"gfn_{args.task}_seed{args.seed}",
    )


# ------------------------------------------------------------------------------------------------ records


def sample_records(epoch: int, batch, trained: bool = True) -> list[dict]:
    """One JSON record per scored sample of a batch, for the samples file."""
    tokens, lengths, rewards = batch.tokens.cpu(), batch.lengths.cpu(), batch.rewards
    records = []
    for i, text in enumerate(rewards.texts):
        result = rewards.oracle_results[i]
        records.append(
            {
                "epoch": epoch,
                "x": text,
                "token_ids": tokens[i, : int(lengths[i])].tolist(),
                "y": result.response,
                "y_token_ids": result.token_ids,
                "x_retokenises": rewards.retokenises[i] if rewards.retokenises is not None else None,
                **{name: _finite_or_none(term[i]) for name, term in rewards.terms.items()},
                "log_reward": _finite_or_none(rewards.log_reward[i]),
                "valid": bool(rewards.valid[i]),
                "error": result.error,
                "truncated": result.truncated,
                "response_tokens": result.num_tokens,
                "usage": result.usage or None,
                "trained": trained,
                **(
                    {
                        "written_by_oracle": bool(batch.written_by_oracle[i]),
                        # what this row cost the oracle: its answer, and its writing when that was a call apart
                        "oracle_calls": 2 if batch.written_by_oracle[i] and not batch.answered_when_written else 1,
                    }
                    if batch.written_by_oracle is not None
                    else {}
                ),
                **({"local_search": bool(batch.local_search[i])} if batch.local_search is not None else {}),
                **(rewards.extras[i] if rewards.extras else {}),
            }
        )
    return records


def length_histogram(lengths: torch.Tensor) -> dict[str, int]:
    """{length: count} of the sampled x (string keys: JSON and W&B)."""
    values, counts = torch.unique(lengths.cpu(), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def report_invalid(out: Outputs, epoch: int, rewards) -> None:
    """One line naming why samples were left out of this step (oracle errors, non-finite rewards)."""
    bad = [
        (
            text,
            result.error
            or "non-finite reward (" + ", ".join(f"{k}={float(t[i]):.4g}" for k, t in rewards.terms.items()) + ")",
        )
        for i, (text, result, ok) in enumerate(zip(rewards.texts, rewards.oracle_results, rewards.valid.tolist()))
        if not ok
    ]
    if bad:
        reasons = "; ".join(sorted({reason for _, reason in bad}))
        out.line(f"epoch {epoch}: {len(bad)} sample(s) skipped: {reasons}; first: {bad[0][0][:80]!r}")


# ------------------------------------------------------------------------------------------------ metrics


def step_metrics(
    run,
    objective,
    batch,
    epoch: int,
    loss,
    outputs,
    log_reward,
    lengths,
    num_fresh: int,
    temperature: float,
    started: float,
) -> dict:
    """The step's metrics (after the last of its updates): losses, log Z, each reward term, calls, timings."""
    rewards, valid = batch.rewards, batch.rewards.valid
    log_pf = outputs.log_pf.detach()
    fresh = slice(0, num_fresh)
    return {
        "epoch": epoch,
        "train/loss": loss.item(),
        "train/log_Z": (
            run.log_z(batch.condition).item() if objective.learned_log_z else vargrad_log_z(log_pf, log_reward)
        ),
        "train/reward_temperature": temperature,
        "train/lr": run.optimizer.param_groups[0]["lr"],
        "train/log_pf_mean": log_pf[fresh].mean().item(),
        "train/log_reward_mean": log_reward[fresh].mean().item(),
        **{f"train/{name}_mean": float(term[valid].mean()) for name, term in rewards.terms.items()},
        "train/num_invalid": int((~valid).sum()),
        "train/num_truncated": sum(r.truncated for r in rewards.oracle_results),
        "train/oracle_calls": run.reward_model.oracle_calls,
        "train/reward_calls": run.reward_model.reward_calls,
        "train/proposal_calls": run.reward_model.proposal_calls,
        **({"train/fresh_x_redrawn": run.source.redrawn} if getattr(run.source, "fresh_x_tries", 0) else {}),
        **(
            {"train/retokenised_changed": sum(not same for same in rewards.retokenises)}
            if rewards.oracle_saw_text and rewards.retokenises is not None
            else {}
        ),
        "train/mean_length": lengths[fresh].float().mean().item(),
        "train/length_histogram": length_histogram(batch.lengths),
        "train/epoch_seconds": time.time() - started,
        "train/updates": run.args.updates_per_batch,
        "train/num_replayed": len(lengths) - num_fresh,
        **importance_metrics(batch, log_reward[fresh].detach().cpu(), log_pf[fresh].cpu()),
        **{
            f"eval/{k}": v
            for k, v in sample_metrics(
                rewards.texts, [t[:n].tolist() for t, n in zip(batch.tokens.cpu(), batch.lengths.cpu())]
            ).items()
        },
        **({f"api/{k}": v for k, v in run.api.stats().items()} if run.api is not None else {}),
    }


def importance_metrics(batch, log_reward, log_pf) -> dict:
    """eval/* importance estimates over the valid fresh rows the policy drew itself: an x the oracle wrote has no
    proposal density we know (its log_q would be the policy's, not the oracle's), so it would bias them. Empty
    when the oracle wrote every row."""
    valid = batch.rewards.valid.cpu()
    drawn = torch.ones(int(valid.sum()), dtype=torch.bool)
    if batch.written_by_oracle is not None:
        drawn = ~batch.written_by_oracle.cpu()[valid]
    if not drawn.any():
        return {}
    log_q = batch.log_q.cpu()[valid][drawn]
    return {f"eval/{k}": v for k, v in batch_metrics(log_reward[drawn], log_pf[drawn], log_q).items()}


def postfix(metrics: dict, paid: bool) -> dict:
    shown = {
        "loss": f"{metrics['train/loss']:.3g}",
        "logZ": f"{metrics['train/log_Z']:.2f}",
        "logR": f"{metrics['train/log_reward_mean']:.1f}",
    }
    return {**shown, "cost": f"${metrics['api/dollars']:.4f}"} if paid else shown
