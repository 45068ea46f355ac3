"""Checkpoints: written atomically, loaded with torch.load(weights_only=True), checked for our format, and the
whole run state saved and restored in one place (`save_run` / `restore_run`, symmetric).

A checkpoint holds the policy (its trainable state and, apart from the command line, its construction record),
log Z, the optimizer, every rank's RNG states (the replay buffer's own generator included), the replay buffer's
contents (memory) or key prefix (Redis), the batch source's state (a pending Batch API round, the batch sent
ahead by prefetch), the run id that tags the spend ledger, the epoch, the reward-evaluation counts and the run's
arguments (which never contain the API key: it is read from the environment and kept nowhere else)."""

from __future__ import annotations

import glob
import os
import re

import torch

import distributed
from durable_files import atomic_write
from errors import UserError

FORMAT = "dataset-sucker-gfn/2"
OLD_FORMATS = ("dataset-sucker-gfn/1",)


def checkpoint_path(output_dir: str, task: str, epoch: int) -> str:
    return os.path.join(output_dir, f"checkpoint_gfn_{task}_epoch{epoch}.pt")


def save_checkpoint(path: str, state: dict) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str) -> dict:
    """Load and validate; every failure is a one-line UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle of foreign objects, not a torch file at all
        # torch's own message suggests weights_only=False, i.e. running code from an untrusted file: never repeat it
        reason = (
            "it holds objects other than tensors and plain data"
            if "weights_only" in str(exc).lower()
            else (str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
        )
        raise UserError(
            f"cannot read checkpoint {path}: corrupt or not a checkpoint of this project ({reason})"
        ) from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, *OLD_FORMATS):
        raise UserError(f"{path} is not a checkpoint of this project (expected format {FORMAT!r})")
    if state["format"] != FORMAT:
        state = migrate(state)
    missing = [k for k in ("epoch", "args", "policy", "policy_record", "log_z", "optimizer", "rng") if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is missing {', '.join(missing)}")
    return state


def migrate(state: dict) -> dict:
    """Format 1 (before 2026-11-29) -> 2: the policy's construction record was spread over the command line
    (`args["policy"]`, `args["prior_model"]`), `policy_config` and `lora_settings`; the source's state was
    `batch_round`; LoRA policies then always stopped on the LM's end-of-text token."""
    args = state.get("args") or {}
    lora = state.get("lora_settings")
    if lora is not None:
        lora = {**lora, "stop": lora.get("stop", "eos")}
    return {
        **state,
        "format": FORMAT,
        "source_state": state.get("batch_round"),
        "policy_record": {
            "kind": args.get("policy", "transformer"),
            "config": state.get("policy_config"),
            "lora": lora,
            "prior_model": args.get("prior_model"),
        },
    }


def latest_checkpoint(output_dir: str, task: str) -> str:
    """The checkpoint with the highest epoch for this task in output_dir."""
    pattern = os.path.join(output_dir, f"checkpoint_gfn_{task}_epoch*.pt")
    found = []
    for path in glob.glob(pattern):
        match = re.search(r"_epoch(\d+)\.pt$", path)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        raise UserError(f"--resume: no checkpoint_gfn_{task}_epoch*.pt in {output_dir}")
    return max(found)[1]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- run state


def save_run(run, epoch: int) -> str:
    """Checkpoint every piece of the run's state. Collective under torchrun (every rank's RNG states are
    gathered); rank 0 writes. Returns the path."""
    path = checkpoint_path(run.args.output_dir, run.args.task, epoch)
    rng_per_rank = distributed.gather_to_main({**rng_state(), "replay": run.replay_rng.getstate()}, run.dist_info)
    if not run.dist_info.is_main:
        return path
    save_checkpoint(
        path,
        {
            "epoch": epoch,
            "run_id": run.run_id,
            "args": vars(run.args),
            "policy_record": run.record,
            "policy": run.policy.trainable_state(),
            "log_z": run.log_z.state_dict(),
            "log_z_conditions": run.log_z.conditions,
            "optimizer": run.optimizer.state_dict(),
            "rng": rng_state(),
            "rng_per_rank": rng_per_rank,
            "world_size": run.dist_info.world_size,
            "replay": run.replay.state_dict() if run.replay is not None else None,
            "source_state": run.source.checkpoint_state() if run.source is not None else None,
            "oracle_calls": run.reward_model.oracle_calls,
            "reward_calls": run.reward_model.reward_calls,
            "proposal_calls": run.reward_model.proposal_calls,
            "oracle_proposals": run.reward_model.proposal_state(),
            "api_totals": run.api.cost.snapshot() if run.api is not None else None,
        },
    )
    return path


def restore_run(run, state: dict) -> int:
    """Put a checkpoint's state back into a run built from it (build.build_run); returns the epoch it ends."""
    if state.get("log_z_conditions", [""]) != run.log_z.conditions:
        raise UserError("the checkpoint was trained on other conditions (examples) than this run's --data")
    info = run.dist_info
    run.log_z.load_state_dict(state["log_z"])
    run.optimizer.load_state_dict(state["optimizer"])  # its learning rates are replaced every epoch
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    own = per_rank[info.rank] if len(per_rank) == info.world_size else state["rng"]
    restore_rng_state(own)
    if "replay" in own:
        run.replay_rng.setstate(own["replay"])
    if run.replay is not None and state.get("replay") is not None:
        run.replay.load_state_dict(state["replay"])
    run.reward_model.oracle_calls = state.get("oracle_calls", 0)
    run.reward_model.reward_calls = state.get("reward_calls", run.reward_model.oracle_calls)
    run.reward_model.proposal_calls = state.get("proposal_calls", 0)
    run.reward_model.load_proposal_state(state.get("oracle_proposals"))
    if run.api is not None and state.get("api_totals"):
        run.api.cost.restore(state["api_totals"])  # the budget spans restarts...
        if state.get("run_id"):  # ...and what was paid after the checkpoint is in the ledger
            run.api.resume_spending(state["run_id"])
    return state["epoch"]
