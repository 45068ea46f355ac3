"""Checkpoints: written atomically, loaded with torch.load(weights_only=True), checked for our format.

A checkpoint holds the policy, log Z, optimizer state, RNG states, the epoch and the run's arguments (which
never contain the API key: it is read from the environment and kept nowhere else)."""
from __future__ import annotations

import glob
import os
import re

import torch

from durable_files import atomic_write
from errors import UserError

FORMAT = "dataset-sucker-gfn/1"


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
        reason = "it holds objects other than tensors and plain data" if "weights_only" in str(exc).lower() \
            else (str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
        raise UserError(f"cannot read checkpoint {path}: corrupt or not a checkpoint of this project ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (expected format {FORMAT!r})")
    missing = [k for k in ("epoch", "args", "policy", "policy_config", "log_z", "optimizer", "rng") if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is missing {', '.join(missing)}")
    return state


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
