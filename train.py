"""The one GFlowNet training loop. suck_gpt4.py and demo.py are this file with other defaults.

Each epoch: sample a batch of x from the exploration policy, score log R(x) = w_prior log p(x) + w_llm log p(y|x),
append every scored sample to the samples file, then take one trajectory-balance step with log P_F recomputed
under the current, untempered policy.

  python train.py --prior-model gpt2 --oracle hf --oracle-model gpt2 --task raw --epochs 200
"""
from __future__ import annotations

import sys

if __name__ == "__main__":  # bad flags and --help answer before torch and transformers load (a second, not ten)
    import flags

    flags.check_command_line(sys.argv[1:], __doc__)

import argparse
import dataclasses
import json
import math
import os
import random
import time
import uuid
from dataclasses import asdict

import torch

import distributed
from checkpoint import (checkpoint_path, latest_checkpoint, load_checkpoint, restore_rng_state, rng_state,
                        save_checkpoint)
from durable_files import JsonlAppender, NullAppender
from errors import UserError
from flags import add_arguments, build_parser, validate_args  # noqa: F401  (re-exported: scripts and tests)
from evaluation import batch_metrics, sample_metrics
from gflownet_policy import AutoregressivePolicy, LogZ, PolicyConfig, TransformerPolicy, make_lora_policy
from hf_models import describe_special_tokens, document_end_id, document_start_id, load_causal_lm, resolve_device
from batch_pipeline import BatchAPIBatches, PrefetchBatches, SyncBatches
from reward_oracle import TASKS, HFResponseOracle, PriorScorer, RewardBatch, RewardModel
from trajectory_balance import gflownet_loss, vargrad_log_z


# ---------------------------------------------------------------------------------------------- building

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_prior(args: argparse.Namespace, device: torch.device):
    return load_causal_lm(args.prior_model, device, DTYPES[args.dtype], reload=getattr(args, "policy", "transformer") == "lora")


def build_oracle(args: argparse.Namespace, device: torch.device):
    task = TASKS[args.task]
    if args.oracle == "hf":
        model, tokenizer = load_causal_lm(args.oracle_model or args.prior_model, device, DTYPES[args.dtype])
        return HFResponseOracle(model, tokenizer, task, temperature=args.llm_temperature,
                                max_new_tokens=args.max_response_tokens, target_response=args.target_response,
                                prompt_format=args.oracle_format)
    from api_client import OpenAIChatOracle, RetryPolicy, load_prices

    return OpenAIChatOracle(
        args.model, task, temperature=args.llm_temperature, max_tokens=args.max_response_tokens,
        max_workers=args.max_api_workers, base_url=args.base_url, target_response=args.target_response,
        timeout_s=args.api_timeout, retry=RetryPolicy(max_attempts=args.max_attempts), rpm=args.rpm, tpm=args.tpm,
        cache_path=os.path.join(args.output_dir, "response_cache.sqlite"), store_responses=not args.no_cache,
        prices=load_prices(args.prices), prompt_format=args.oracle_format,
        adaptive_concurrency=not args.fixed_concurrency,
    )


def build_reward_model(args: argparse.Namespace, prior_model, tokenizer, device: torch.device,
                       with_oracle: bool = True) -> RewardModel:
    prior = PriorScorer(prior_model, tokenizer, include_eos=args.prior_include_eos)
    oracle = build_oracle(args, device) if with_oracle and args.llm_weight != 0 else None
    return RewardModel(tokenizer, prior, oracle, prior_weight=args.prior_weight, llm_weight=args.llm_weight)


def policy_vocab_size(prior_model, tokenizer) -> int:
    # Some checkpoints pad the embedding matrix past the tokenizer; only real tokens are actions.
    return min(len(tokenizer), prior_model.get_output_embeddings().weight.shape[0])


def policy_config(args: argparse.Namespace, prior_model, tokenizer) -> PolicyConfig:
    return PolicyConfig(
        vocab_size=policy_vocab_size(prior_model, tokenizer), max_len=args.max_len, min_len=args.min_len,
        d_model=args.d_model, num_layers=args.num_layers, num_heads=args.num_heads,
        banned_token_ids=tuple(sorted(set(tokenizer.all_special_ids))),
    )


def build_policy(args: argparse.Namespace, prior_model, tokenizer, device: torch.device,
                 config: PolicyConfig | None = None, lora_settings: dict | None = None) -> AutoregressivePolicy:
    """`--policy transformer`: a fresh transformer over the prior's vocabulary. `--policy lora`: the prior LM
    itself with LoRA adapters (one copy of the weights; the prior is scored with the adapters off)."""
    config = config or policy_config(args, prior_model, tokenizer)
    if getattr(args, "policy", "transformer") == "transformer":
        return TransformerPolicy(config).to(device)
    settings = lora_settings or {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                                 "target_modules": args.lora_target_modules, "stop": args.lora_stop}
    stop_token_id = document_end_id(tokenizer)
    banned = tuple(sorted(set(config.banned_token_ids) | {stop_token_id}))  # STOP is that token, not a token action
    config = PolicyConfig(**{**asdict(config), "banned_token_ids": banned})
    try:
        return make_lora_policy(prior_model, config, document_start_id(tokenizer), stop_token_id, r=settings["r"],
                                alpha=settings["alpha"], dropout=settings["dropout"], target_modules=settings["target_modules"],
                                stop_mode=settings.get("stop", "eos"))
    except ValueError as exc:  # peft: target modules not found in the model, unknown architecture
        raise UserError(f"cannot add LoRA adapters to {args.prior_model!r}: {str(exc).splitlines()[0]}") from None


def build_policy_for_checkpoint(state: dict, prior_model, tokenizer, device: torch.device) -> AutoregressivePolicy:
    config = dict(state["policy_config"])
    config["banned_token_ids"] = tuple(config.get("banned_token_ids", ()))
    run_args = argparse.Namespace(**state["args"])
    policy = build_policy(run_args, prior_model, tokenizer, device, config=PolicyConfig(**config),
                          lora_settings=state.get("lora_settings"))
    try:
        policy.load_trainable_state(state["policy"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"checkpoint policy does not match its own config: {str(exc).splitlines()[0]}") from None
    return policy


def make_optimizer(policy: torch.nn.Module, log_z: LogZ, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.Adam([
        {"params": [p for p in policy.parameters() if p.requires_grad], "lr": args.lr},
        {"params": list(log_z.parameters()), "lr": args.lr_z},
    ])


# ------------------------------------------------------------------------------------------------ output


def sample_records(epoch: int, tokens: torch.Tensor, lengths: torch.Tensor, rewards, trained: bool = True) -> list[dict]:
    records = []
    for i, text in enumerate(rewards.texts):
        result = rewards.oracle_results[i]
        records.append({
            "epoch": epoch, "x": text, "token_ids": tokens[i, : int(lengths[i])].tolist(), "y": result.response,
            "y_token_ids": result.token_ids,
            "x_retokenises": rewards.retokenises[i] if rewards.retokenises is not None else None,
            "log_prior": float(rewards.log_prior[i]), "log_likelihood": _finite_or_none(rewards.log_likelihood[i]),
            "log_reward": _finite_or_none(rewards.log_reward[i]), "valid": bool(rewards.valid[i]),
            "error": result.error, "truncated": result.truncated, "response_tokens": result.num_tokens,
            "usage": result.usage or None, "trained": trained, **(rewards.extras[i] if rewards.extras else {}),
        })
    return records


def replay_items(tokens: torch.Tensor, lengths: torch.Tensor, rewards) -> list:
    """The valid fresh samples, with their untempered reward components, for the replay buffer."""
    from replay_buffer import ReplayItem

    items = []
    for i, text in enumerate(rewards.texts):
        if bool(rewards.valid[i]):
            items.append(ReplayItem(token_ids=tokens[i, : int(lengths[i])].tolist(), text=text, log_prior=float(rewards.log_prior[i]),
                                    log_likelihood=float(rewards.log_likelihood[i]),
                                    extra={"y": rewards.oracle_results[i].response}))
    return items


def length_histogram(lengths: torch.Tensor) -> dict[str, int]:
    """{length: count} of the sampled x (string keys: JSON and W&B)."""
    values, counts = torch.unique(lengths.cpu(), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def _finite_or_none(value: torch.Tensor) -> float | None:
    value = float(value)
    return value if torch.isfinite(torch.tensor(value)) else None


def init_wandb(args: argparse.Namespace):
    mode = args.wandb_mode or ("online" if args.wandb_project else "disabled")
    if mode == "disabled":
        return None
    import wandb

    # vars(args) never holds the API key: it is read from the environment by the oracle alone.
    return wandb.init(project=args.wandb_project or "dataset-sucker", mode=mode, config=vars(args),
                      dir=args.output_dir, name=f"gfn_{args.task}_seed{args.seed}")


# ------------------------------------------------------------------------------------------------- train


def build_replay_buffer(args: argparse.Namespace, run_id: str):
    if args.replay_fraction <= 0:
        return None
    from replay_buffer import make_replay_buffer

    try:
        return make_replay_buffer(args.replay_backend, args.replay_capacity, priority=args.replay_priority,
                                  near_duplicate_threshold=args.replay_near_duplicate, redis_url=args.redis_url,
                                  namespace=f"gfn-replay-{args.task}-{run_id[:16]}")  # one run's keys
    except ValueError as exc:
        raise UserError(f"replay buffer: {exc}") from None


def replay_batch(buffer, args: argparse.Namespace, num_fresh: int, device: torch.device, condition: str = "",
                 generator: random.Random | None = None):
    """Replayed (tokens, lengths, log_prior, log_likelihood) making up --replay-fraction of the training batch."""
    if buffer is None or buffer.size(condition) == 0:
        return None
    num = round(args.replay_fraction / (1 - args.replay_fraction) * num_fresh)
    items = buffer.sample(num, condition=condition, prior_weight=args.prior_weight, llm_weight=args.llm_weight,
                          generator=generator) if num else []
    if not items:
        return None
    tokens = torch.zeros(len(items), args.max_len, dtype=torch.long, device=device)
    for i, item in enumerate(items):
        tokens[i, : len(item.token_ids)] = torch.tensor(item.token_ids, device=device)
    lengths = torch.tensor([len(item.token_ids) for item in items], device=device)
    log_prior = torch.tensor([item.log_prior for item in items], dtype=torch.float64)
    log_likelihood = torch.tensor([item.log_likelihood for item in items], dtype=torch.float64)
    return tokens, lengths, log_prior, log_likelihood


def batch_to_cpu(batch):
    if batch is None:
        return None
    return dataclasses.replace(batch, tokens=batch.tokens.cpu(), lengths=batch.lengths.cpu(), log_q=batch.log_q.cpu(),
                               context=None if batch.context is None else batch.context.cpu())


def shard(batch, rank: int, world_size: int, device: torch.device):
    """Rank `rank`'s contiguous share of a batch scored by rank 0 (asymmetric mode)."""
    size = len(batch.rewards.texts) // world_size
    part = slice(rank * size, (rank + 1) * size)
    r = batch.rewards
    rewards = RewardBatch(r.texts[part], r.log_prior[part], r.log_likelihood[part], r.log_reward[part], r.valid[part],
                          r.oracle_results[part], r.extras[part] if r.extras else None)
    return dataclasses.replace(batch, tokens=batch.tokens[part].to(device), lengths=batch.lengths[part].to(device),
                               log_q=batch.log_q[part].to(device), rewards=rewards,
                               context=None if batch.context is None else batch.context.to(device))


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


def make_batch_source(args: argparse.Namespace, policy, reward_model, may_spend, save_now, resume_state):
    resume_state = resume_state or {}
    source_state = resume_state.get("source_state", resume_state.get("batch_round"))  # "batch_round": format 1
    common = dict(batch_size=args.batch_size, temperature=args.temperature, epsilon=args.epsilon, may_spend=may_spend,
                  tempered_fraction=args.tempered_fraction, temperature_range=tuple(args.temperature_range))
    if args.batch_api:
        return BatchAPIBatches(policy, reward_model, pool_size=args.batch_pool_size, poll_seconds=args.batch_poll_seconds,
                               save_checkpoint=save_now, round_state=source_state, **common)
    if use_prefetch(args):
        return PrefetchBatches(policy, reward_model, pending_state=source_state, **common)
    return SyncBatches(policy, reward_model, **common)


def use_prefetch(args: argparse.Namespace) -> bool:
    # On by default only with a remote oracle: a local oracle competes with training for the same device and
    # its sampling would share the RNG with the policy's across threads (no bit-exact resume).
    return args.prefetch if args.prefetch is not None else (args.oracle == "openai" and args.llm_weight != 0)


def train(args: argparse.Namespace, on_start=None, on_epoch=None) -> dict:
    """Run (or resume) training as configured by args. `on_start(policy, reward_model)` runs once before the
    first epoch (demo.py shows samples there); `on_epoch(metrics, policy, log_z)` after every optimizer step
    (benchmarks/exact_target.py measures the exact distribution there). Returns the final metrics and the
    trained objects."""
    validate_args(args)
    if args.oracle == "openai" and args.llm_weight != 0 and args.task != "contradiction":
        from api_client import api_key_from_env, load_prices, preflight, price_for

        api_key_from_env(args.base_url)  # fail on a missing key before loading any model
        if args.max_cost is not None and price_for(args.model, load_prices(args.prices)) is None:
            raise UserError(f"--max-cost: no price known for model {args.model!r}; give one with --prices FILE.json")
        # A dead server, a wrong --model or misaligned echo logprobs are reported now, in seconds
        for note in preflight(args.model, args.base_url, args.api_timeout, args.target_response):
            print(note, file=sys.stderr)
    resume_state = None
    if args.resume:
        path = latest_checkpoint(args.output_dir, args.task) if args.resume == "latest" else args.resume
        resume_state = load_checkpoint(path)
    dist_info = distributed.setup()
    if dist_info.enabled and args.batch_api:
        raise UserError("--batch-api is not supported under torchrun: run it in one process")
    device = resolve_device(args.device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    builds_reward = dist_info.is_main or not args.reward_rank0  # asymmetric mode: only rank 0 scores
    torch.manual_seed(args.seed)  # the same on every rank: identical initial parameters

    prior_model, tokenizer = load_prior(args, device)
    if dist_info.is_main:
        print(f"prior {args.prior_model}: {describe_special_tokens(tokenizer)}", file=sys.stderr)
    if resume_state is not None:
        policy = build_policy_for_checkpoint(resume_state, prior_model, tokenizer, device)
    else:
        policy = build_policy(args, prior_model, tokenizer, device)
    if policy.config.vocab_size != policy_vocab_size(prior_model, tokenizer):
        raise UserError(f"the checkpoint's policy vocabulary ({policy.config.vocab_size}) does not match "
                        f"--prior-model {args.prior_model!r} ({policy_vocab_size(prior_model, tokenizer)})")
    examples = None
    if args.task == "contradiction":
        from contradiction_task import build_reward as build_contradiction_reward, load_dataset

        examples = load_dataset(args.data)
        log_z = LogZ([example["id"] for example in examples]).to(device)  # one log Z per example
        reward_model = RewardModel(tokenizer, PriorScorer(prior_model, tokenizer), None)  # unused by this task
        contradiction_reward = build_contradiction_reward(args, prior_model, tokenizer, device) if builds_reward else None
    else:
        log_z = LogZ().to(device)
        reward_model = build_reward_model(args, prior_model, tokenizer, device, with_oracle=builds_reward)
    optimizer = make_optimizer(policy, log_z, args)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    if args.loss == "modified-subtb" and not reward_model.can_score_prefixes():
        raise UserError("--loss modified-subtb scores every prefix of x: use --llm-weight 0, or --oracle hf with --target-response")
    api = reward_model.oracle if hasattr(reward_model.oracle, "stats") else None  # the remote oracle, if any
    start_epoch = 0
    if resume_state is not None:
        if resume_state.get("log_z_conditions", [""]) != log_z.conditions:
            raise UserError("the checkpoint was trained on other conditions (examples) than this run's --data")
        log_z.load_state_dict(resume_state["log_z"])
        optimizer.load_state_dict(resume_state["optimizer"])  # its learning rates are replaced every epoch
        per_rank = resume_state.get("rng_per_rank") or [resume_state["rng"]]
        restore_rng_state(per_rank[dist_info.rank] if len(per_rank) == dist_info.world_size else resume_state["rng"])
        start_epoch = resume_state["epoch"]
        if api is not None and resume_state.get("api_totals"):
            api.cost.restore(resume_state["api_totals"])  # the budget spans restarts...
        print(f"resumed from epoch {start_epoch}", file=sys.stderr)
    # One id for the whole run, kept across resumes: it tags the spend ledger's rows and the Redis replay keys
    run_id = (resume_state or {}).get("run_id") or distributed.broadcast(uuid.uuid4().hex, dist_info)
    if api is not None and (resume_state or {}).get("run_id"):
        api.resume_spending(run_id)  # ...and what was paid after the checkpoint is in the ledger
    elif api is not None:
        api.run_id = run_id
    if dist_info.enabled and not args.reward_rank0 and (resume_state is None or "rng_per_rank" not in resume_state):
        torch.manual_seed(args.seed + 7919 * dist_info.rank)  # symmetric mode: each rank explores its own x

    # Only rank 0 writes files, logs to W&B and shows progress; the other ranks write nothing.
    os.makedirs(args.output_dir, exist_ok=True)
    samples_file = JsonlAppender(os.path.join(args.output_dir, f"samples_{args.task}.jsonl")) if dist_info.is_main else NullAppender()
    metrics_file = JsonlAppender(os.path.join(args.output_dir, f"metrics_{args.task}.jsonl")) if dist_info.is_main else NullAppender()
    run = init_wandb(args) if dist_info.is_main else None
    progress = None
    if not args.no_progress and dist_info.is_main:
        from tqdm import tqdm

        progress = tqdm(total=args.epochs, initial=start_epoch, desc=f"gfn {args.task}", dynamic_ncols=True)

    def log_line(message: str) -> None:
        (progress.write if progress is not None else lambda m: print(m, file=sys.stderr))(message)

    completed_epoch = start_epoch
    if resume_state is not None:  # the run's counts of reward evaluations go on from the checkpoint's
        reward_model.oracle_calls = resume_state.get("oracle_calls", 0)
        reward_model.reward_calls = resume_state.get("reward_calls", reward_model.oracle_calls)
    source = None

    def save(epoch: int) -> str:
        """Collective under torchrun (every rank's RNG state is gathered); rank 0 writes."""
        path = checkpoint_path(args.output_dir, args.task, epoch)
        rng_per_rank = distributed.gather_to_main({**rng_state(), "replay": replay_rng.getstate()}, dist_info)
        if not dist_info.is_main:
            return path
        save_checkpoint(path, {
            "rng_per_rank": rng_per_rank, "world_size": dist_info.world_size,
            "epoch": epoch, "args": vars(args), "policy": policy.trainable_state(),
            "lora_settings": getattr(policy, "lora_settings", None),
            "policy_config": asdict(policy.config), "log_z": log_z.state_dict(), "log_z_conditions": log_z.conditions,
            "optimizer": optimizer.state_dict(), "rng": rng_state(),
            "oracle_calls": reward_model.oracle_calls, "reward_calls": reward_model.reward_calls,
            "api_totals": api.cost.snapshot() if api is not None else None,
            "run_id": run_id,
            "replay": replay.state_dict() if replay is not None else None,
            "source_state": source.checkpoint_state() if source is not None else None,
        })
        return path

    spend = {"batches": 0}

    def may_spend() -> bool:
        """Before each paid batch: stop when the spend so far plus one more batch at the average cost so far
        would pass --max-cost."""
        if api is None or args.max_cost is None:
            return True
        dollars = api.cost.snapshot()["dollars"]
        per_batch = dollars / spend["batches"] if spend["batches"] else 0.0
        spend["batches"] += 1
        return dollars + per_batch <= args.max_cost

    # Asymmetric mode: rank 0 samples and scores world_size batches at once; the other ranks have no source.
    source_args = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size * (dist_info.world_size if args.reward_rank0 else 1)})
    if not builds_reward:
        source = None
    elif args.task == "contradiction":
        from contradiction_task import ContradictionBatches

        source = ContradictionBatches(policy, tokenizer, examples, contradiction_reward, start_epoch, batch_size=source_args.batch_size,
                                      temperature=args.temperature, epsilon=args.epsilon, may_spend=may_spend,
                                      tempered_fraction=args.tempered_fraction, temperature_range=tuple(args.temperature_range))
    else:
        source = make_batch_source(source_args, policy, reward_model, may_spend, lambda: save(completed_epoch), resume_state)
    replay = build_replay_buffer(args, run_id)
    # replay draws come from their own seeded generator, saved per rank with the other RNG states
    replay_rng = random.Random(args.seed + 7919 * dist_info.rank)
    if resume_state is not None and replay is not None and resume_state.get("replay") is not None:
        replay.load_state_dict(resume_state["replay"])
        own_rng = (resume_state.get("rng_per_rank") or [{}])[dist_info.rank if len(resume_state.get("rng_per_rank") or []) == dist_info.world_size else 0]
        if "replay" in own_rng:
            replay_rng.setstate(own_rng["replay"])
    if on_start is not None:
        on_start(policy, reward_model)
    metrics: dict = {}
    last_saved = None
    stop_reason = None
    unreachable_batches = 0
    clean_exit = False
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            started = time.time()
            # before any optimizer step of this epoch; flags given now win over a resumed checkpoint's rates
            for group, base_lr in zip(optimizer.param_groups, (args.lr, args.lr_z)):
                group["lr"] = base_lr * learning_rate_factor(args, epoch)
            # 1-2. a batch sampled from the exploration policy (tempered / epsilon-mixed; no gradients flow
            # through sampling) and scored; every scored sample is written before anything can fail
            batch = source.next(more=epoch < args.epochs) if source is not None else None
            if dist_info.enabled and args.reward_rank0:
                batch = distributed.broadcast(batch_to_cpu(batch) if dist_info.is_main else None, dist_info)
                if batch is not None:
                    samples_file.write(sample_records(epoch, batch.tokens, batch.lengths, batch.rewards))
                    batch = shard(batch, dist_info.rank, dist_info.world_size, device)
            elif dist_info.enabled:
                records = sample_records(epoch, batch.tokens, batch.lengths, batch.rewards) if batch is not None else None
                gathered = distributed.gather_to_main(records, dist_info)
                for rank_records in gathered or []:
                    samples_file.write(rank_records or [])
                if distributed.any_rank(batch is None, dist_info):
                    batch = None
            elif batch is not None:
                samples_file.write(sample_records(epoch, batch.tokens, batch.lengths, batch.rewards))
            if batch is None:
                stop_reason = (f"budget: ${api.cost.snapshot()['dollars']:.4f} spent of --max-cost ${args.max_cost}"
                               if api is not None else "budget reached on rank 0")
                break
            tokens, lengths, log_q, rewards = batch.tokens, batch.lengths, batch.log_q, batch.rewards
            # A server that went away fails every request after its retries: stop instead of skipping epochs
            unreachable = bool(rewards.oracle_results) and all(r.unreachable for r in rewards.oracle_results)
            unreachable_batches = unreachable_batches + 1 if unreachable else 0
            if distributed.any_rank(unreachable_batches >= args.max_unreachable_batches, dist_info):
                last_saved = save(completed_epoch) if completed_epoch > start_epoch else None
                raise UserError(f"the oracle server stopped answering: every request of the last {unreachable_batches} "
                                f"batches failed ({rewards.oracle_results[0].error}); "
                                + (f"saved {last_saved}" if last_saved else "nothing trained since the start"))
            valid = rewards.valid.to(device)
            num_invalid = int((~valid).sum())
            if num_invalid:
                bad = [(text, r.error or f"non-finite reward (log p(x)={float(p):.4g}, log p(y|x)={float(l):.4g})")
                       for text, r, ok, p, l in zip(rewards.texts, rewards.oracle_results, rewards.valid.tolist(),
                                                    rewards.log_prior, rewards.log_likelihood) if not ok]
                reasons = sorted({reason for _, reason in bad})
                log_line(f"epoch {epoch}: {num_invalid} sample(s) skipped: {'; '.join(reasons)}; first: {bad[0][0][:80]!r}")
            if not bool(valid.any()):
                if dist_info.enabled:  # still join this step's collectives, contributing nothing
                    initialize_log_z(log_z, batch.condition, None, None, dist_info)
                    distributed.any_rank(False, dist_info)
                    optimizer.zero_grad(set_to_none=True)
                    distributed.average_gradients(trainable, dist_info)
                    optimizer.step()
                metrics = {"epoch": epoch, "train/num_invalid": num_invalid}
                metrics_file.write([metrics])
                completed_epoch = epoch
                continue
            # 3. one step of the loss on log P_F of the untempered policy, recomputed under the current parameters,
            # on the valid fresh samples plus replayed ones (whose rewards are recomputed from stored components)
            tokens, lengths, log_q = tokens[valid], lengths[valid], log_q[valid]
            num_fresh = len(tokens)
            temperature = reward_temperature(args, epoch)
            log_reward = rewards.log_reward.to(device)[valid].float() / temperature
            replayed = replay_batch(replay, args, num_fresh, device, batch.condition, replay_rng)
            if replay is not None:
                replay.add(replay_items(batch.tokens, batch.lengths, rewards), condition=batch.condition,
                           prior_weight=args.prior_weight, llm_weight=args.llm_weight)
            if replayed is not None:
                replay_log_reward = args.prior_weight * replayed[2] + args.llm_weight * replayed[3]
                tokens = torch.cat([tokens, replayed[0]])
                lengths = torch.cat([lengths, replayed[1]])
                log_reward = torch.cat([log_reward, replay_log_reward.to(device).float() / temperature])
            policy.set_training_dropout(True)
            outputs = policy.evaluate(tokens, lengths, batch.context)
            policy.set_training_dropout(False)
            log_pf = outputs.log_pf
            prefix_log_reward = None
            if args.loss == "modified-subtb":
                prefix_log_reward = (reward_model.prefix_log_rewards(tokens, lengths, policy.config.min_len) / temperature).to(device).float()
            initialize_log_z(log_z, batch.condition, log_reward, log_pf.detach(), dist_info)
            loss = gflownet_loss(args.loss, outputs, log_z(batch.condition), log_reward, lengths, subtb_lambda=args.subtb_lambda,
                                 prefix_log_reward=prefix_log_reward, min_len=policy.config.min_len)
            if distributed.any_rank(not bool(torch.isfinite(loss)), dist_info):
                # Never let a NaN/inf reach the weights: report the offending sample and skip the step.
                texts = [t for t, ok in zip(rewards.texts, rewards.valid.tolist()) if ok]
                bad = int((~torch.isfinite(log_pf)).nonzero().flatten()[:1].sum())
                log_line(f"epoch {epoch}: non-finite loss (log_pf={log_pf[bad].item()}, sample {texts[bad]!r}); step skipped")
                metrics_file.write([{"epoch": epoch, "train/skipped_non_finite": 1}])
                completed_epoch = epoch
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(trainable, dist_info)  # every rank then takes the same step
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            completed_epoch = epoch

            valid_cpu = rewards.valid
            metrics = {
                "epoch": epoch,
                **({"train/tb_loss": loss.item()} if args.loss == "tb" else {}),
                "train/loss": loss.item(),
                "train/log_Z": log_z(batch.condition).item() if args.loss != "vargrad" else vargrad_log_z(log_pf.detach(), log_reward),
                "train/reward_temperature": temperature,
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/log_pf_mean": log_pf[:num_fresh].mean().item(),
                "train/log_reward_mean": log_reward[:num_fresh].mean().item(),
                "train/log_prior_mean": float(rewards.log_prior[valid_cpu].mean()),
                "train/log_likelihood_mean": float(rewards.log_likelihood[valid_cpu].mean()),
                "train/num_invalid": num_invalid,
                "train/num_truncated": sum(r.truncated for r in rewards.oracle_results),
                "train/oracle_calls": reward_model.oracle_calls,
                "train/reward_calls": reward_model.reward_calls,
                **({"train/retokenised_changed": sum(not same for same in rewards.retokenises)}
                   if rewards.oracle_saw_text and rewards.retokenises is not None else {}),
                "train/mean_length": lengths[:num_fresh].float().mean().item(),
                "train/length_histogram": length_histogram(batch.lengths),
                "train/epoch_seconds": time.time() - started,
                "train/num_replayed": len(tokens) - num_fresh,
                **{f"eval/{k}": v for k, v in batch_metrics(log_reward[:num_fresh].detach().cpu(), log_pf[:num_fresh].detach().cpu(), log_q.cpu()).items()},
                **{f"eval/{k}": v for k, v in sample_metrics(rewards.texts, [t[:n].tolist() for t, n in zip(tokens[:num_fresh].cpu(), lengths[:num_fresh].cpu())]).items()},
                **({f"api/{k}": v for k, v in api.stats().items()} if api is not None else {}),
            }
            metrics_file.write([metrics])
            if on_epoch is not None:
                on_epoch(metrics, policy, log_z)
            if run is not None:
                run.log(metrics, step=epoch)
            if progress is not None:
                progress.update(1)
                postfix = {"loss": f"{metrics['train/loss']:.3g}", "logZ": f"{metrics['train/log_Z']:.2f}",
                           "logR": f"{metrics['train/log_reward_mean']:.1f}"}
                if api is not None:
                    postfix["cost"] = f"${metrics['api/dollars']:.4f}"
                progress.set_postfix(postfix)
            else:
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True)
            if epoch % args.save_every == 0 or epoch == args.epochs:
                last_saved = save(epoch)
        if stop_reason is not None or (args.epochs == 0 and start_epoch == 0):
            last_saved = save(completed_epoch)  # at the budget, or the untrained policy for --epochs 0
            if stop_reason is not None:
                log_line(f"stopped at epoch {completed_epoch}: {stop_reason}; saved {last_saved}")
        clean_exit = True
    except KeyboardInterrupt:
        # Keep what was trained: checkpoint the last completed epoch, then stop.
        if completed_epoch > start_epoch:
            last_saved = save(completed_epoch)
        print(f"\ninterrupted; saved {last_saved}", file=sys.stderr)
        raise
    finally:
        # Batches scored ahead (prefetch, the rest of a Batch API pool) were paid for: keep their samples.
        try:
            for leftover in (source.drain() if source is not None else []):
                samples_file.write(sample_records(completed_epoch + 1, leftover.tokens, leftover.lengths,
                                                  leftover.rewards, trained=False))
        finally:
            if progress is not None:
                progress.close()
            samples_file.close()
            metrics_file.close()
            if run is not None:
                run.finish()
            close = getattr(reward_model.oracle, "close", None)
            if close:
                close()
            distributed.teardown(dist_info, clean_exit)
    return {"metrics": metrics, "checkpoint": last_saved, "epochs": args.epochs, "policy": policy, "log_z": log_z,
            "reward_model": reward_model, "output_dir": args.output_dir, "stop_reason": stop_reason,
            "api_stats": api.stats() if api is not None else None}


def main(argv: list[str] | None = None, description: str = __doc__, defaults: dict | None = None,
         on_start=None, on_end=None) -> int:
    """Parse flags, train, and turn user mistakes into one line on stderr and exit code 2.
    on_start(policy, reward_model) and on_end(result) let other entry points look in without copying the loop."""
    args = build_parser(description, defaults).parse_args(argv)
    try:
        result = train(args, on_start=on_start)
        if on_end is not None:
            on_end(result)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"done: {result['checkpoint']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
