"""The one GFlowNet training loop. suck_gpt4.py and demo.py are this file with other defaults.

Each epoch: sample a batch of x from the exploration policy, score it (log R(x) = w_prior log p(x) + w_llm log p(y|x)
by default; each task's formula over its named terms), append every scored sample to the samples file, then take
--updates-per-batch steps of the objective (trajectory balance by default) on it plus replayed samples, with log P_F
recomputed under the current, untempered policy. Everything is built before the loop (build.py), what a run writes
is in run_log.py, and the run's state is saved and restored in one place (checkpoint.save_run / restore_run).

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
from flags import build_parser, validate_args  # noqa: F401  (build_parser re-exported: scripts and tests use it)
from gflownet_policy import LogZ
from replay_buffer import ReplayItem
from reward_oracle import RewardFormula, padded_token_ids, replay_formula, stack_terms
from run_log import Outputs, postfix, report_invalid, sample_records, step_metrics
from trajectory_balance import OBJECTIVES, gflownet_loss

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
    out = Outputs(args, dist_info, start_epoch, run.run_id)
    if on_start is not None:
        on_start(run.policy, run.reward_model)
    metrics, last_saved, stop_reason, unreachable_batches, clean_exit = {}, None, None, 0, False
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            started = time.time()
            # learning rates: a function of the epoch alone, so a resumed run continues the schedule
            for group, base_lr, warm in zip(run.optimizer.param_groups, (args.lr, args.lr_z), (True, False)):
                group["lr"] = base_lr * learning_rate_factor(args, epoch, warm)

            if run.source is not None and args.oracle_proposal_fraction_end is not None:
                run.source.oracle_proposal_fraction = oracle_proposal_fraction(args, epoch)
                run.source.local_search_fraction = local_search_fraction(args, epoch)
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
            unreachable_batches = check_server(run, batch, unreachable_batches, completed_epoch, start_epoch)
            report_invalid(out, epoch, batch.rewards)

            # 2.-3. --updates-per-batch steps on this batch, each on its valid fresh samples plus freshly drawn
            # replayed ones (the fresh samples join the buffer once), with log R / T
            temperature = reward_temperature(args, epoch)
            for update in range(args.updates_per_batch):
                tokens, lengths, log_reward, num_fresh = training_batch(run, batch, temperature, store=update == 0)
                loss, outputs = objective_step(run, objective, batch, tokens, lengths, log_reward, temperature)
                if loss is None:
                    break
            completed_epoch = epoch

            # 4. metrics, logging and checkpoints
            if loss is None:
                metrics = {"epoch": epoch, "train/num_invalid": int((~batch.rewards.valid).sum())}
                if num_fresh:
                    metrics["train/skipped_non_finite"] = 1
                    out.line(f"epoch {epoch}: non-finite loss; step skipped")  # never let a NaN/inf reach the weights
                out.metrics.write([metrics])
            else:
                metrics = step_metrics(
                    run, objective, batch, epoch, loss, outputs, log_reward, lengths, num_fresh, temperature, started
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
        close_run(run, out, completed_epoch, clean_exit)
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


def check_server(run: build.Run, batch, unreachable_batches: int, completed_epoch: int, start_epoch: int) -> int:
    """A server that went away fails every request after its retries: after --max-unreachable-batches such
    batches in a row, checkpoint and stop with one line instead of skipping epochs. Returns the new count."""
    sent = sent_requests(batch.rewards.oracle_results)
    unreachable_batches = unreachable_batches_after(sent, unreachable_batches)
    if distributed.any_rank(unreachable_batches >= run.args.max_unreachable_batches, run.dist_info):
        last_saved = save_run(run, completed_epoch) if completed_epoch > start_epoch else None
        reason = sent[0].error if sent else "no request sent"
        raise UserError(
            f"the oracle server stopped answering: every request of the last {unreachable_batches} "
            f"batches failed ({reason}); "
            + (f"saved {last_saved}" if last_saved else "nothing trained since the start")
        )
    return unreachable_batches


def sent_requests(results: list) -> list:
    """The results the server was asked for: a response-cache hit says nothing about whether it is up."""
    return [r for r in results if not r.usage.get("cached_response")]


def unreachable_batches_after(sent: list, unreachable_batches: int) -> int:
    """The count of batches in a row whose every sent request found no server: +1 when all of this batch's did,
    unchanged when it sent none (all from the cache: a dead server would otherwise be kept alive by repeats,
    as one was on 2026-12-02), else 0."""
    if not sent:
        return unreachable_batches
    return unreachable_batches + 1 if all(r.unreachable for r in sent) else 0


def objective_step(run: build.Run, objective, batch, tokens, lengths, log_reward, temperature: float):
    """One optimizer step of the objective on log P_F recomputed under the current parameters. Returns (loss,
    the policy's outputs), or (None, None) when nothing was trained: every sample invalid (the collectives are
    still joined) or a non-finite loss, which never reaches the weights (skipped on every rank)."""
    args, dist_info = run.args, run.dist_info
    run.optimizer.zero_grad(set_to_none=True)
    loss = outputs = None
    if len(tokens):
        run.policy.set_training_dropout(True)
        outputs = run.policy.evaluate(tokens, lengths, batch.context)
        run.policy.set_training_dropout(False)
        prefix_log_reward = None
        if objective.needs_prefix_rewards:
            min_len = run.policy.config.min_len
            prefix_log_reward = (run.reward_model.prefix_log_rewards(tokens, lengths, min_len) / temperature).float()
            prefix_log_reward = prefix_log_reward.to(run.device)
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
        return None, None
    if loss is not None:
        loss.backward()
    distributed.average_gradients(run.trainable, dist_info)  # every rank then takes the same step
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.policy.parameters(), args.max_grad_norm)
    run.optimizer.step()
    return loss, outputs


def close_run(run: build.Run, out: Outputs, completed_epoch: int, clean_exit: bool) -> None:
    """Batches scored ahead (prefetch, the rest of a Batch API pool) were paid for: keep their samples. Then close
    the files, the oracle and the process group."""
    try:
        for leftover in run.source.drain() if run.source is not None else []:
            out.samples.write(sample_records(completed_epoch + 1, leftover, trained=False))
    finally:
        out.close()
        close = getattr(run.reward_model.oracle, "close", None)
        if close:
            close()
        distributed.teardown(run.dist_info, clean_exit)


def training_batch(run: build.Run, batch, temperature: float, store: bool = True):
    """(tokens, lengths, log R / T, number of fresh rows): the valid fresh samples, then replayed ones (their
    rewards recomputed from the stored terms by the batch's own formula); with `store`, the fresh ones join the
    buffer after the draw."""
    args, device = run.args, run.device
    valid = batch.rewards.valid.to(device)
    tokens, lengths = batch.tokens[valid], batch.lengths[valid]
    log_reward = batch.rewards.log_reward.to(device)[valid].float() / temperature
    num_fresh = len(tokens)
    if run.replay is None or not num_fresh:
        return tokens, lengths, log_reward, num_fresh
    formula = batch.rewards.formula
    replayed = replay_batch(run.replay, args, num_fresh, device, batch.condition, run.replay_rng, formula)
    if store:
        run.replay.add(replay_items(batch), condition=batch.condition, log_reward=replay_formula(formula))
    if replayed is not None:
        replay_tokens, replay_lengths, replay_terms = replayed
        tokens, lengths = torch.cat([tokens, replay_tokens]), torch.cat([lengths, replay_lengths])
        log_reward = torch.cat([log_reward, formula(replay_terms).to(device).float() / temperature])
    return tokens, lengths, log_reward, num_fresh


# ------------------------------------------------------------------------------------ records and replay


def replay_items(batch) -> list[ReplayItem]:
    """The valid fresh samples, with their untempered reward terms, for the replay buffer."""
    tokens, lengths, rewards = batch.tokens.cpu(), batch.lengths.cpu(), batch.rewards
    items = []
    for i, text in enumerate(rewards.texts):
        if bool(rewards.valid[i]):
            items.append(
                ReplayItem(
                    token_ids=tokens[i, : int(lengths[i])].tolist(),
                    text=text,
                    terms={name: float(term[i]) for name, term in rewards.terms.items()},
                    extra={"y": rewards.oracle_results[i].response},
                )
            )
    return items


def replay_batch(
    buffer,
    args: argparse.Namespace,
    num_fresh: int,
    device: torch.device,
    condition: str,
    generator: random.Random,
    formula: RewardFormula,
):
    """Replayed (tokens, lengths, terms) making up --replay-fraction of the training batch, drawn by the log
    rewards `formula` gives their stored terms."""
    if buffer is None or buffer.size(condition) == 0:
        return None
    num = round(args.replay_fraction / (1 - args.replay_fraction) * num_fresh)
    items = (
        buffer.sample(num, condition=condition, log_reward=replay_formula(formula), generator=generator) if num else []
    )
    if not items:
        return None
    tokens, lengths = padded_token_ids([item.token_ids for item in items], args.max_len, device)
    return tokens, lengths, stack_terms([item.terms for item in items])


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


def oracle_proposal_fraction(args: argparse.Namespace, epoch: int) -> float:
    """The oracle's share of the batch at `epoch`: --oracle-proposal-fraction until the first epoch of
    --oracle-proposal-anneal, linearly to --oracle-proposal-fraction-end at its last. The oracle's search finds
    the regions it answers confidently early and then dries up; the policy, trained on its finds, takes over. A
    function of the epoch alone, so a resumed run continues the schedule."""
    first, last = args.oracle_proposal_anneal
    start, end = args.oracle_proposal_fraction, args.oracle_proposal_fraction_end
    if end is None or epoch <= first:
        return start
    return end if epoch >= last else start + (end - start) * (epoch - first) / (last - first)


def local_search_fraction(args: argparse.Namespace, epoch: int) -> float:
    """Local search's share at `epoch`: --local-search-fraction, plus what the oracle has given up by then when
    --oracle-proposal-handoff is local-search."""
    if args.oracle_proposal_handoff != "local-search":
        return args.local_search_fraction
    return args.local_search_fraction + args.oracle_proposal_fraction - oracle_proposal_fraction(args, epoch)


def learning_rate_factor(args: argparse.Namespace, epoch: int, warm_up: bool = True) -> float:
    """Multiplier of --lr and --lr-z at this epoch; a function of the epoch alone, so a resumed run continues it.
    The warm-up applies to the policy only: log Z starts at the first batch's estimate and should move at once."""
    warmup = min(1.0, epoch / args.lr_warmup_epochs) if warm_up and args.lr_warmup_epochs > 0 else 1.0
    if args.lr_schedule == "constant" or args.epochs <= 1:
        return warmup
    progress = min(1.0, (epoch - 1) / (args.epochs - 1))
    return warmup * (args.lr_min_factor + (1 - args.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * progress)))


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
