"""The one GFlowNet training loop. suck_gpt4.py and demo.py are this file with other defaults.

Each epoch: sample a batch of x from the exploration policy, score log R(x) = w_prior log p(x) + w_llm log p(y|x),
append every scored sample to the samples file, then take one step of the objective (trajectory balance by
default) with log P_F recomputed under the current, untempered policy. Everything is built before the loop
(build.py) and the run's state is saved and restored in one place (checkpoint.save_run / restore_run).

  python train.py --prior-model gpt2 --oracle hf --oracle-model gpt2 --task raw --epochs 200
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # bad flags and --help answer before torch and transformers load (a second, not ten)
    import flags

    flags.check_command_line(sys.argv[1:], __doc__)

import argparse
import math
import random
import time

import torch

import build
import distributed
from api_client import Budget
from checkpoint import latest_checkpoint, load_checkpoint, restore_run, save_run
from errors import UserError, run_cli
from evaluation import batch_metrics, sample_metrics
from flags import build_parser, validate_args  # noqa: F401  (build_parser re-exported: scripts and tests use it)
from gflownet_policy import LogZ
from replay_buffer import ReplayItem
from trajectory_balance import OBJECTIVES, gflownet_loss, vargrad_log_z

# ------------------------------------------------------------------------------------------------ the loop


def train(args: argparse.Namespace, on_start=None, on_epoch=None) -> dict:
    """Run (or resume) training as configured by args. `on_start(policy, reward_model)` runs once before the
    first epoch (demo.py shows samples there); `on_epoch(metrics, policy, log_z)` after every optimizer step
    (benchmarks/exact_target.py measures the exact distribution there). Returns the final metrics and the
    trained objects."""
    validate_args(args)
    build.check_remote_oracle(args)  # key, price, server, model: before any model is loaded
    resume_state = None
    if args.resume:
        resume_state = load_checkpoint(
            latest_checkpoint(args.output_dir, args.task) if args.resume == "latest" else args.resume
        )
    dist_info = distributed.setup()
    if dist_info.enabled and args.batch_api:
        raise UserError("--batch-api is not supported under torchrun: run it in one process")
    run = build.build_run(args, dist_info, resume_state)
    start_epoch = restore_run(run, resume_state) if resume_state is not None else 0
    if resume_state is not None:
        print(f"resumed from epoch {start_epoch}", file=sys.stderr)
    if dist_info.enabled and not args.reward_rank0 and (resume_state is None or "rng_per_rank" not in resume_state):
        torch.manual_seed(args.seed + 7919 * dist_info.rank)  # symmetric mode: each rank explores its own x
    objective = OBJECTIVES[args.loss]
    budget = Budget(run.api, args.max_cost)
    completed_epoch = start_epoch
    run.source = build.build_source(
        run,
        start_epoch,
        budget.allows_another_batch,
        lambda: save_run(run, completed_epoch),
        (resume_state or {}).get("source_state"),
    )
    out = build.Outputs(args, dist_info, start_epoch)
    if on_start is not None:
        on_start(run.policy, run.reward_model)
    metrics, last_saved, stop_reason, unreachable_batches, clean_exit = {}, None, None, 0, False
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            started = time.time()
            # learning rates: a function of the epoch alone, so a resumed run continues the schedule
            for group, base_lr in zip(run.optimizer.param_groups, (args.lr, args.lr_z)):
                group["lr"] = base_lr * learning_rate_factor(args, epoch)

            # 1. a scored batch from the exploration policy (every scored sample is written before anything can
            # fail); None when the budget is spent
            batch = run.source.next(more=epoch < args.epochs) if run.source is not None else None
            batch, records = distributed.share_batch(
                batch, dist_info, run.device, args.reward_rank0, lambda b: sample_records(epoch, b)
            )
            out.samples.write(records)
            if batch is None:
                stop_reason = budget.stop_reason()
                break
            # a server that went away fails every request after its retries: stop instead of skipping epochs
            results = batch.rewards.oracle_results
            unreachable_batches = unreachable_batches + 1 if results and all(r.unreachable for r in results) else 0
            if distributed.any_rank(unreachable_batches >= args.max_unreachable_batches, dist_info):
                last_saved = save_run(run, completed_epoch) if completed_epoch > start_epoch else None
                raise UserError(
                    f"the oracle server stopped answering: every request of the last {unreachable_batches} "
                    f"batches failed ({results[0].error}); "
                    + (f"saved {last_saved}" if last_saved else "nothing trained since the start")
                )

            # 2. the training batch: the valid fresh samples plus replayed ones, log R / T
            report_invalid(out, epoch, batch.rewards)
            temperature = reward_temperature(args, epoch)
            tokens, lengths, log_reward, num_fresh = training_batch(run, batch, temperature)

            # 3. one step of the objective on log P_F recomputed under the current parameters
            run.optimizer.zero_grad(set_to_none=True)
            loss = outputs = None
            if num_fresh:  # a batch whose every sample is invalid trains nothing (but joins the collectives)
                run.policy.set_training_dropout(True)
                outputs = run.policy.evaluate(tokens, lengths, batch.context)
                run.policy.set_training_dropout(False)
                prefix_log_reward = None
                if objective.needs_prefix_rewards:
                    prefix_log_reward = (
                        (run.reward_model.prefix_log_rewards(tokens, lengths, run.policy.config.min_len) / temperature)
                        .to(run.device)
                        .float()
                    )
                initialize_log_z(run.log_z, batch.condition, log_reward, outputs.log_pf.detach(), dist_info)
                loss = gflownet_loss(
                    args.loss,
                    outputs,
                    run.log_z(batch.condition),
                    log_reward,
                    lengths,
                    subtb_lambda=args.subtb_lambda,
                    prefix_log_reward=prefix_log_reward,
                    min_len=run.policy.config.min_len,
                )
            else:
                initialize_log_z(run.log_z, batch.condition, None, None, dist_info)
            if distributed.any_rank(loss is not None and not bool(torch.isfinite(loss)), dist_info):
                out.line(f"epoch {epoch}: non-finite loss; step skipped")  # never let a NaN/inf reach the weights
                out.metrics.write([{"epoch": epoch, "train/skipped_non_finite": 1}])
                completed_epoch = epoch
                continue
            if loss is not None:
                loss.backward()
            distributed.average_gradients(run.trainable, dist_info)  # every rank then takes the same step
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(run.policy.parameters(), args.max_grad_norm)
            run.optimizer.step()
            completed_epoch = epoch

            # 4. metrics, logging and checkpoints
            if loss is None:
                metrics = {"epoch": epoch, "train/num_invalid": len(batch.rewards.texts)}
                out.metrics.write([metrics])
            else:
                metrics = step_metrics(
                    run,
                    objective,
                    batch,
                    epoch,
                    loss,
                    outputs,
                    log_reward,
                    lengths,
                    num_fresh,
                    temperature,
                    time.time() - started,
                )
                out.log(metrics, postfix(metrics, run.api is not None))
                if on_epoch is not None:
                    on_epoch(metrics, run.policy, run.log_z)
            if epoch % args.save_every == 0 or epoch == args.epochs:
                last_saved = save_run(run, epoch)
        if stop_reason is not None or (args.epochs == 0 and start_epoch == 0):
            last_saved = save_run(run, completed_epoch)  # at the budget, or the untrained policy for --epochs 0
            if stop_reason is not None:
                out.line(f"stopped at epoch {completed_epoch}: {stop_reason}; saved {last_saved}")
        clean_exit = True
    except KeyboardInterrupt:  # keep what was trained: checkpoint the last completed epoch, then stop
        if completed_epoch > start_epoch:
            last_saved = save_run(run, completed_epoch)
        print(f"\ninterrupted; saved {last_saved}", file=sys.stderr)
        raise
    finally:
        try:  # batches scored ahead (prefetch, the rest of a Batch API pool) were paid for: keep their samples
            for leftover in run.source.drain() if run.source is not None else []:
                out.samples.write(sample_records(completed_epoch + 1, leftover, trained=False))
        finally:
            out.close()
            close = getattr(run.reward_model.oracle, "close", None)
            if close:
                close()
            distributed.teardown(dist_info, clean_exit)
    return {
        "metrics": metrics,
        "checkpoint": last_saved,
        "epochs": args.epochs,
        "policy": run.policy,
        "log_z": run.log_z,
        "reward_model": run.reward_model,
        "output_dir": args.output_dir,
        "stop_reason": stop_reason,
        "api_stats": run.api.stats() if run.api is not None else None,
    }


# ---------------------------------------------------------------------------------------- the loop's steps


def report_invalid(out: build.Outputs, epoch: int, rewards) -> None:
    """One line naming why samples were left out of this step (oracle errors, non-finite rewards)."""
    bad = [
        (text, r.error or f"non-finite reward (log p(x)={float(p):.4g}, log p(y|x)={float(lik):.4g})")
        for text, r, ok, p, lik in zip(
            rewards.texts, rewards.oracle_results, rewards.valid.tolist(), rewards.log_prior, rewards.log_likelihood
        )
        if not ok
    ]
    if bad:
        reasons = "; ".join(sorted({reason for _, reason in bad}))
        out.line(f"epoch {epoch}: {len(bad)} sample(s) skipped: {reasons}; first: {bad[0][0][:80]!r}")


def training_batch(run: build.Run, batch, temperature: float):
    """(tokens, lengths, log R / T, number of fresh rows): the valid fresh samples, then replayed ones (their
    rewards recomputed from the stored terms); the fresh ones join the buffer after the draw."""
    args, device = run.args, run.device
    valid = batch.rewards.valid.to(device)
    tokens, lengths = batch.tokens[valid], batch.lengths[valid]
    log_reward = batch.rewards.log_reward.to(device)[valid].float() / temperature
    num_fresh = len(tokens)
    if run.replay is None or not num_fresh:
        return tokens, lengths, log_reward, num_fresh
    replayed = replay_batch(run.replay, args, num_fresh, device, batch.condition, run.replay_rng)
    run.replay.add(
        replay_items(batch), condition=batch.condition, prior_weight=args.prior_weight, llm_weight=args.llm_weight
    )
    if replayed is not None:
        replay_log_reward = args.prior_weight * replayed[2] + args.llm_weight * replayed[3]
        tokens, lengths = torch.cat([tokens, replayed[0]]), torch.cat([lengths, replayed[1]])
        log_reward = torch.cat([log_reward, replay_log_reward.to(device).float() / temperature])
    return tokens, lengths, log_reward, num_fresh


def step_metrics(
    run: build.Run,
    objective,
    batch,
    epoch: int,
    loss,
    outputs,
    log_reward,
    lengths,
    num_fresh: int,
    temperature: float,
    seconds: float,
) -> dict:
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
        "train/log_prior_mean": float(rewards.log_prior[valid].mean()),
        "train/log_likelihood_mean": float(rewards.log_likelihood[valid].mean()),
        "train/num_invalid": int((~valid).sum()),
        "train/num_truncated": sum(r.truncated for r in rewards.oracle_results),
        "train/oracle_calls": run.reward_model.oracle_calls,
        "train/reward_calls": run.reward_model.reward_calls,
        **(
            {"train/retokenised_changed": sum(not same for same in rewards.retokenises)}
            if rewards.oracle_saw_text and rewards.retokenises is not None
            else {}
        ),
        "train/mean_length": lengths[fresh].float().mean().item(),
        "train/length_histogram": length_histogram(batch.lengths),
        "train/epoch_seconds": seconds,
        "train/num_replayed": len(lengths) - num_fresh,
        **{
            f"eval/{k}": v
            for k, v in batch_metrics(
                log_reward[fresh].detach().cpu(), log_pf[fresh].cpu(), batch.log_q[valid.to(batch.log_q.device)].cpu()
            ).items()
        },
        **{
            f"eval/{k}": v
            for k, v in sample_metrics(
                rewards.texts, [t[:n].tolist() for t, n in zip(batch.tokens.cpu(), batch.lengths.cpu())]
            ).items()
        },
        **({f"api/{k}": v for k, v in run.api.stats().items()} if run.api is not None else {}),
    }


def postfix(metrics: dict, paid: bool) -> dict:
    shown = {
        "loss": f"{metrics['train/loss']:.3g}",
        "logZ": f"{metrics['train/log_Z']:.2f}",
        "logR": f"{metrics['train/log_reward_mean']:.1f}",
    }
    return {**shown, "cost": f"${metrics['api/dollars']:.4f}"} if paid else shown


# ------------------------------------------------------------------------------------ records and replay


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
                "log_prior": float(rewards.log_prior[i]),
                "log_likelihood": _finite_or_none(rewards.log_likelihood[i]),
                "log_reward": _finite_or_none(rewards.log_reward[i]),
                "valid": bool(rewards.valid[i]),
                "error": result.error,
                "truncated": result.truncated,
                "response_tokens": result.num_tokens,
                "usage": result.usage or None,
                "trained": trained,
                **(rewards.extras[i] if rewards.extras else {}),
            }
        )
    return records


def replay_items(batch) -> list[ReplayItem]:
    """The valid fresh samples, with their untempered reward components, for the replay buffer."""
    tokens, lengths, rewards = batch.tokens.cpu(), batch.lengths.cpu(), batch.rewards
    items = []
    for i, text in enumerate(rewards.texts):
        if bool(rewards.valid[i]):
            items.append(
                ReplayItem(
                    token_ids=tokens[i, : int(lengths[i])].tolist(),
                    text=text,
                    log_prior=float(rewards.log_prior[i]),
                    log_likelihood=float(rewards.log_likelihood[i]),
                    extra={"y": rewards.oracle_results[i].response},
                )
            )
    return items


def length_histogram(lengths: torch.Tensor) -> dict[str, int]:
    """{length: count} of the sampled x (string keys: JSON and W&B)."""
    values, counts = torch.unique(lengths.cpu(), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def replay_batch(
    buffer,
    args: argparse.Namespace,
    num_fresh: int,
    device: torch.device,
    condition: str = "",
    generator: random.Random | None = None,
):
    """Replayed (tokens, lengths, log_prior, log_likelihood) making up --replay-fraction of the training batch."""
    if buffer is None or buffer.size(condition) == 0:
        return None
    num = round(args.replay_fraction / (1 - args.replay_fraction) * num_fresh)
    items = (
        buffer.sample(
            num, condition=condition, prior_weight=args.prior_weight, llm_weight=args.llm_weight, generator=generator
        )
        if num
        else []
    )
    if not items:
        return None
    tokens = torch.zeros(len(items), args.max_len, dtype=torch.long, device=device)
    for i, item in enumerate(items):
        tokens[i, : len(item.token_ids)] = torch.tensor(item.token_ids, device=device)
    lengths = torch.tensor([len(item.token_ids) for item in items], device=device)
    log_prior = torch.tensor([item.log_prior for item in items], dtype=torch.float64)
    log_likelihood = torch.tensor([item.log_likelihood for item in items], dtype=torch.float64)
    return tokens, lengths, log_prior, log_likelihood


# ------------------------------------------------------------------------------------------------ schedules


def initialize_log_z(log_z: LogZ, condition: str, log_reward, log_pf, dist_info) -> None:
    """First batch of a condition: log Z = mean(log R - log P_F) over the whole batch, i.e. over every rank's
    shard under torchrun (the same value a single process would get from the same batch)."""
    if log_z.is_initialized(condition):
        return
    total = torch.zeros(2, dtype=torch.float64, device=log_z.values.device)
    if log_reward is not None:
        total[0], total[1] = (log_reward - log_pf).double().sum(), len(log_reward)
    if dist_info.enabled:
        torch.distributed.all_reduce(total)
    if total[1] > 0:
        log_z.initialize_from(total[0:1] / total[1], torch.zeros(1, device=total.device), condition)


def reward_temperature(args: argparse.Namespace, epoch: int) -> float:
    """Linear anneal from --reward-temp-start to --reward-temp-end over --reward-temp-horizon epochs."""
    if args.reward_temp_horizon <= 0:
        return args.reward_temp_start
    progress = min(1.0, (epoch - 1) / args.reward_temp_horizon)
    return args.reward_temp_start + progress * (args.reward_temp_end - args.reward_temp_start)


def learning_rate_factor(args: argparse.Namespace, epoch: int) -> float:
    """Multiplier of --lr and --lr-z at this epoch; a function of the epoch alone, so a resumed run continues it."""
    if args.lr_schedule == "constant" or args.epochs <= 1:
        return 1.0
    progress = min(1.0, (epoch - 1) / (args.epochs - 1))
    return args.lr_min_factor + (1 - args.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def main(
    argv: list[str] | None = None, description: str = __doc__, defaults: dict | None = None, on_start=None, on_end=None
) -> int:
    """Parse flags, train, and turn user mistakes into one line on stderr and exit code 2.
    on_start(policy, reward_model) and on_end(result) let other entry points look in without copying the loop."""
    args = build_parser(description, defaults).parse_args(argv)

    def body() -> None:
        result = train(args, on_start=on_start)
        if on_end is not None:
            on_end(result)
        print(f"done: {result['checkpoint']}", file=sys.stderr)

    try:
        return run_cli(body)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
