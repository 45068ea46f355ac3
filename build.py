"""From flags to objects: everything the training loop needs, assembled once (`build_run`), so that train.py's loop
builds nothing itself. Models, policy (fresh or from a checkpoint's construction record), reward, oracle, batch
source, replay buffer, optimizer, outputs.

Tasks plug in here: `task_plugin(name)` is the prompt-format tasks' generic plug-in (`GenericTask`) or a task
module with the same four functions (`contradiction_task`): `conditions`, `build_reward`, `make_source` and
`evaluate`. Adding a task means a module with those functions and one line in `TASK_MODULES`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import uuid
from dataclasses import asdict, dataclass, field

import torch

import contradiction_task
import distributed
from api_client import OpenAIChatOracle, RetryPolicy, api_key_from_env, preflight
from batch_pipeline import BatchAPIBatches, BatchSource, PrefetchBatches, SyncBatches, exploration_settings
from errors import UserError
from gflownet_policy import AutoregressivePolicy, LogZ, PolicyConfig, TransformerPolicy, make_lora_policy
from hf_models import describe_special_tokens, document_end_id, document_start_id, load_causal_lm, resolve_device
from replay_buffer import ReplayBuffer, make_replay_buffer
from reward_oracle import TASKS, HFResponseOracle, PriorScorer, RewardModel
from spend_ledger import load_prices, price_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ------------------------------------------------------------------------------------------------ models


def load_prior(args: argparse.Namespace, device: torch.device):
    # a LoRA policy injects adapters into the weights it wraps: it gets its own fresh copy
    return load_causal_lm(
        args.prior_model, device, DTYPES[args.dtype], reload=getattr(args, "policy", "transformer") == "lora"
    )


def build_oracle(args: argparse.Namespace, device: torch.device):
    task = TASKS[args.task]
    if args.oracle == "hf":
        model, tokenizer = load_causal_lm(args.oracle_model or args.prior_model, device, DTYPES[args.dtype])
        oracle = HFResponseOracle(
            model,
            tokenizer,
            task,
            temperature=args.llm_temperature,
            max_new_tokens=args.max_response_tokens,
            target_response=args.target_response,
            prompt_format=args.oracle_format,
        )
        if getattr(args, "oracle_proposals", "sample") == "search":
            oracle.start_search()
        return oracle
    return OpenAIChatOracle(
        args.model,
        task,
        temperature=args.llm_temperature,
        max_tokens=args.max_response_tokens,
        max_workers=args.max_api_workers,
        base_url=args.base_url,
        target_response=args.target_response,
        timeout_s=args.api_timeout,
        retry=RetryPolicy(max_attempts=args.max_attempts),
        rpm=args.rpm,
        tpm=args.tpm,
        cache_path=os.path.join(args.output_dir, "response_cache.sqlite"),
        store_responses=not args.no_cache,
        prices=load_prices(args.prices),
        prompt_format=args.oracle_format,
        adaptive_concurrency=not args.fixed_concurrency,
    )


def build_reward_model(
    args: argparse.Namespace, prior_model, tokenizer, device: torch.device, with_oracle: bool = True
) -> RewardModel:
    prior = PriorScorer(prior_model, tokenizer, include_eos=args.prior_include_eos)
    oracle = build_oracle(args, device) if with_oracle and args.llm_weight != 0 else None
    reward_model = RewardModel(
        tokenizer,
        prior,
        oracle,
        prior_weight=args.prior_weight,
        llm_weight=args.llm_weight,
        reference_weight=getattr(args, "reference_weight", 0.0),  # checkpoints from before the flag
    )
    reward_model.answer_proposals_in_place = not getattr(args, "separate_proposal_answers", False)
    return reward_model


def uses_remote_oracle(args: argparse.Namespace) -> bool:
    return args.oracle == "openai" and args.llm_weight != 0 and task_plugin(args.task).uses_oracle_flags


def check_remote_oracle(args: argparse.Namespace) -> None:
    """Before any model is loaded: the key, the price for --max-cost, and the server itself (it answers, serves
    --model, and echoes aligned logprobs for --target-response), so mistakes cost seconds, not a model load."""
    if not uses_remote_oracle(args):
        return
    api_key_from_env(args.base_url)
    if args.max_cost is not None and price_for(args.model, load_prices(args.prices)) is None:
        raise UserError(f"--max-cost: no price known for model {args.model!r}; give one with --prices FILE.json")
    for note in preflight(args.model, args.base_url, args.api_timeout, args.target_response):
        print(note, file=sys.stderr)


# ------------------------------------------------------------------------------------------------ policy


def policy_vocab_size(prior_model, tokenizer) -> int:
    # Some checkpoints pad the embedding matrix past the tokenizer; only real tokens are actions.
    return min(len(tokenizer), prior_model.get_output_embeddings().weight.shape[0])


def policy_record(args: argparse.Namespace, prior_model, tokenizer) -> dict:
    """How to construct the policy, saved in checkpoints apart from the command line (so renaming a flag never
    breaks a checkpoint): its kind, PolicyConfig and, for LoRA, the adapter settings."""
    config = PolicyConfig(
        vocab_size=policy_vocab_size(prior_model, tokenizer),
        max_len=args.max_len,
        min_len=args.min_len,
        d_model=args.d_model,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        banned_token_ids=tuple(sorted(set(tokenizer.all_special_ids))),
    )
    lora = None
    if args.policy == "lora":
        lora = {
            "r": args.lora_r,
            "alpha": args.lora_alpha,
            "dropout": args.lora_dropout,
            "target_modules": args.lora_target_modules,
            "stop": args.lora_stop,
        }
    return {"kind": args.policy, "config": asdict(config), "lora": lora, "prior_model": args.prior_model}


def build_policy(
    args: argparse.Namespace | None, prior_model, tokenizer, device: torch.device, record: dict | None = None
) -> AutoregressivePolicy:
    """`transformer`: a fresh transformer over the prior's vocabulary. `lora`: the prior LM itself with LoRA
    adapters (one copy of the weights; the prior is scored with the adapters off)."""
    record = record or policy_record(args, prior_model, tokenizer)
    config = PolicyConfig(**{**record["config"], "banned_token_ids": tuple(record["config"]["banned_token_ids"])})
    if record["kind"] == "transformer":
        return TransformerPolicy(config).to(device)
    settings = record["lora"]
    stop_token_id = document_end_id(tokenizer)
    banned = tuple(sorted(set(config.banned_token_ids) | {stop_token_id}))  # never a token action
    config = PolicyConfig(**{**asdict(config), "banned_token_ids": banned})
    try:
        return make_lora_policy(
            prior_model,
            config,
            document_start_id(tokenizer),
            stop_token_id,
            r=settings["r"],
            alpha=settings["alpha"],
            dropout=settings["dropout"],
            target_modules=settings["target_modules"],
            stop_mode=settings.get("stop", "eos"),
        )
    except ValueError as exc:  # peft: target modules not found in the model, unknown architecture
        raise UserError(f"cannot add LoRA adapters to {record['prior_model']!r}: {str(exc).splitlines()[0]}") from None


def build_policy_for_checkpoint(state: dict, prior_model, tokenizer, device: torch.device) -> AutoregressivePolicy:
    policy = build_policy(None, prior_model, tokenizer, device, record=state["policy_record"])
    try:
        policy.load_trainable_state(state["policy"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"checkpoint policy does not match its own config: {str(exc).splitlines()[0]}") from None
    return policy


def make_optimizer(policy: torch.nn.Module, log_z: LogZ, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        [
            {"params": [p for p in policy.parameters() if p.requires_grad], "lr": args.lr},
            {"params": list(log_z.parameters()), "lr": args.lr_z},
        ]
    )


# ------------------------------------------------------------------------------------------------- tasks


class GenericTask:
    """The prompt-format tasks (raw, assistant, creative, code): R(x) = p(x)^w_prior p(y|x)^w_llm, one log Z."""

    uses_oracle_flags = True  # --oracle / --model / --base-url apply

    @staticmethod
    def conditions(args: argparse.Namespace) -> list[str]:
        return [""]

    @staticmethod
    def build_reward(args, prior_model, tokenizer, device, builds_reward: bool) -> RewardModel:
        return build_reward_model(args, prior_model, tokenizer, device, with_oracle=builds_reward)

    @staticmethod
    def make_source(args, run: "Run", may_spend, save_now, source_state: dict | None, start_epoch: int) -> BatchSource:
        common = {**exploration_settings(args, may_spend), "replay": run.replay, "replay_rng": run.replay_rng}
        if args.batch_api:
            return BatchAPIBatches(
                run.policy,
                run.reward_model,
                pool_size=args.batch_pool_size,
                poll_seconds=args.batch_poll_seconds,
                save_checkpoint=save_now,
                round_state=source_state,
                **common,
            )
        if use_prefetch(args):
            return PrefetchBatches(run.policy, run.reward_model, pending_state=source_state, **common)
        return SyncBatches(
            run.policy, run.reward_model, scored_texts=(source_state or {}).get("scored_texts"), **common
        )


TASK_MODULES = {"contradiction": contradiction_task}


def task_plugin(name: str):
    return TASK_MODULES.get(name, GenericTask)


def use_prefetch(args: argparse.Namespace) -> bool:
    # On by default only with a remote oracle: a local oracle competes with training for the same device and
    # its sampling would share the RNG with the policy's across threads (no bit-exact resume).
    # Oracle proposals are written while the batch is sampled: synchronous batches only (flags.py refuses --prefetch).
    if args.prefetch is None and args.oracle_proposal_fraction:
        return False
    return args.prefetch if args.prefetch is not None else (args.oracle == "openai" and args.llm_weight != 0)


# --------------------------------------------------------------------------------------------------- run


@dataclass
class Run:
    """Every object of one training run, and its identity. Saved and restored by checkpoint.save_run/restore_run."""

    args: argparse.Namespace
    dist_info: distributed.DistInfo
    device: torch.device
    prior_model: torch.nn.Module
    tokenizer: object
    policy: AutoregressivePolicy
    record: dict  # the policy's construction record
    log_z: LogZ
    reward_model: RewardModel
    optimizer: torch.optim.Optimizer
    run_id: str
    replay_rng: random.Random
    api: object | None = None  # the remote oracle, when there is one: its spending and stats
    replay: ReplayBuffer | None = None
    source: BatchSource | None = None
    trainable: list = field(default_factory=list)


def build_run(args: argparse.Namespace, dist_info: distributed.DistInfo, resume_state: dict | None) -> Run:
    """The run's objects, fresh or as the checkpoint describes them (their state is restored by restore_run)."""
    device = resolve_device(args.device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    builds_reward = dist_info.is_main or not args.reward_rank0  # asymmetric mode: only rank 0 scores
    torch.manual_seed(args.seed)  # the same on every rank: identical initial parameters
    prior_model, tokenizer = load_prior(args, device)
    if dist_info.is_main:
        print(f"prior {args.prior_model}: {describe_special_tokens(tokenizer)}", file=sys.stderr)
    if resume_state is not None:
        record = resume_state["policy_record"]
        policy = build_policy_for_checkpoint(resume_state, prior_model, tokenizer, device)
    else:
        record = policy_record(args, prior_model, tokenizer)
        policy = build_policy(args, prior_model, tokenizer, device, record=record)
    if policy.config.vocab_size != policy_vocab_size(prior_model, tokenizer):
        raise UserError(
            f"the checkpoint's policy vocabulary ({policy.config.vocab_size}) does not match "
            f"--prior-model {args.prior_model!r} ({policy_vocab_size(prior_model, tokenizer)})"
        )
    task = task_plugin(args.task)
    log_z = LogZ(task.conditions(args)).to(device)  # one log Z per condition (per example for conditioned tasks)
    reward_model = task.build_reward(args, prior_model, tokenizer, device, builds_reward)
    if args.loss == "modified-subtb" and not reward_model.can_score_prefixes():
        raise UserError(
            "--loss modified-subtb scores every prefix of x: use --llm-weight 0, or --oracle hf with --target-response"
        )
    optimizer = make_optimizer(policy, log_z, args)
    # One id for the whole run, kept across resumes: it tags the spend ledger's rows and the Redis replay keys
    run_id = (resume_state or {}).get("run_id") or distributed.broadcast(uuid.uuid4().hex, dist_info)
    api = reward_model.oracle if getattr(reward_model.oracle, "has_spending", False) else None
    run = Run(
        args,
        dist_info,
        device,
        prior_model,
        tokenizer,
        policy,
        record,
        log_z,
        reward_model,
        optimizer,
        run_id,
        random.Random(args.seed + 7919 * dist_info.rank),
        api=api,
        replay=build_replay_buffer(args, run_id),
        trainable=[p for group in optimizer.param_groups for p in group["params"]],
    )
    if api is not None:
        api.run_id = run_id
    return run


def build_source(run: Run, start_epoch: int, may_spend, save_now, source_state: dict | None) -> BatchSource | None:
    """Where scored batches come from. Asymmetric mode (--reward-rank0): rank 0 samples and scores world_size
    batches at once; the other ranks have no source."""
    args, info = run.args, run.dist_info
    if info.enabled and args.reward_rank0 and not info.is_main:
        return None
    source_args = argparse.Namespace(
        **{**vars(args), "batch_size": args.batch_size * (info.world_size if args.reward_rank0 else 1)}
    )
    return task_plugin(args.task).make_source(source_args, run, may_spend, save_now, source_state, start_epoch)


def build_replay_buffer(args: argparse.Namespace, run_id: str) -> ReplayBuffer | None:
    if args.replay_fraction <= 0:
        return None
    try:
        return make_replay_buffer(
            args.replay_backend,
            args.replay_capacity,
            priority=args.replay_priority,
            near_duplicate_threshold=args.replay_near_duplicate,
            novelty_after=args.replay_novelty,
            rank_power=args.replay_rank_power,
            stale_prefix_after=args.replay_stale_prefix,
            prefix_back=args.local_search_back,
            redis_url=args.redis_url,
            namespace=f"gfn-replay-{args.task}-{run_id[:16]}",
        )  # one run's keys
    except ValueError as exc:
        raise UserError(f"replay buffer: {exc}") from None
