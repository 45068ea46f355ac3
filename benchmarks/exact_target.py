"""Exact distribution matching: every loss and policy, and torchgfn's TB, on targets small enough to enumerate.

The target: R(x) = p(x) * p(y* | x) over word sequences x of 1..L tokens from a V-word vocabulary, with p(x) from
one tiny random GPT-2 (the prior) and p(y* | x) the teacher-forced probability another one (the oracle) gives a
fixed response y* ("a b"). Deterministic, so the true distribution R(x) / Z is known exactly by enumeration.
Each run trains with train.py's loop (one reward call per sampled x, `--batch-size` per step) and, every
`--eval-every` reward calls, enumerates the policy's exact probability of every x and reports total variation
(half the L1 sum; `tv_sum` is the full sum), KL both ways and |log Z - true log Z|. torchgfn's TB (MLP over a
one-hot state, its standard setup; benchmarks/torchgfn_baseline.py) runs on the same reward table with the same
batch size and reward-call budget. Prints one JSON object.

  python benchmarks/exact_target.py                       # both targets, one after the other: about 45 min
  python benchmarks/exact_target.py --quick               # seconds: the smoke test the test suite runs
  python benchmarks/exact_target.py --targets 6x5 --output out/exact_6x5.json    # one target (run two at once)
  python benchmarks/exact_target.py --plot-from out/exact_6x5.json out/exact_6x6.json --plot benchmarks/exact_target.png

`--target-kind modes` plants memorised-secret-like modes instead: a few full-length sequences, chosen among those
the prior finds unlikely, and log p(y|x) = beta * k(x), k(x) the longest opening x shares with any of them, with
beta set so that the modes hold `--mode-mass` of the target. Reported beside TV: how many modes the policy has
found (probability at least half their target share) against reward calls, for us and for torchgfn.

  python benchmarks/exact_target.py --target-kind modes --targets 6x5 --losses tb --policies transformer
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tiny-model builders the test fixtures use
os.environ.setdefault("WANDB_MODE", "disabled")

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]
THRESHOLDS = (0.1, 0.05, 0.02)


def build_target(folder: str, vocab_size: int) -> tuple[str, str]:
    """(prior, oracle) folders: two random word-level GPT-2s with large weights, so log R varies by many nats."""
    from conftest import save_tiny_gpt2, word_tokenizer

    words = WORDS[:vocab_size]
    prior = save_tiny_gpt2(os.path.join(folder, "prior"), word_tokenizer(words), seed=2, n_embd=16, init_range=0.3)
    oracle = save_tiny_gpt2(os.path.join(folder, "oracle"), word_tokenizer(words), seed=3, n_embd=16, init_range=0.3)
    return prior, oracle


class PlantedModes:
    """A deterministic oracle for the planted-modes target: log p(y|x) = per_word * (the longest opening x shares
    with any mode). It scores x's token ids (decoded text is re-encoded with the word tokenizer)."""

    deterministic = True
    has_spending = False
    target_ids: list[int] = []

    def __init__(self, tokenizer, modes: list[list[int]], per_word: float) -> None:
        self.tokenizer, self.modes, self.per_word = tokenizer, modes, per_word

    def shared_opening(self, ids: list[int]) -> int:
        best = 0
        for mode in self.modes:
            k = 0
            while k < min(len(ids), len(mode)) and ids[k] == mode[k]:
                k += 1
            best = max(best, k)
        return best

    def score(self, texts: list[str], token_ids: list[list[int]] | None = None):
        from reward_oracle import OracleResult

        rows = token_ids or [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return [OracleResult("", self.per_word * self.shared_opening(row), 0) for row in rows]


def plant_modes(prior: str, vocab_size: int, max_len: int, num_modes: int, mode_mass: float, seed: int):
    """(modes as token id lists, per_word): modes drawn among the full-length sequences in the less likely half
    under the prior; per_word found by bisection so the modes hold mode_mass of R."""
    import random

    import torch

    from gflownet_policy import enumerate_sequences
    from hf_models import load_causal_lm
    from reward_oracle import PriorScorer

    model, tokenizer = load_causal_lm(prior, "cpu")
    tokens, lengths = enumerate_sequences(vocab_size, 1, max_len)
    with torch.no_grad():
        log_prior = PriorScorer(model, tokenizer).log_prob(tokens, lengths).double()
    full = (lengths == max_len).nonzero().flatten()
    rare = full[log_prior[full].argsort()[: len(full) // 2]].tolist()
    chosen = random.Random(seed).sample(rare, num_modes)
    modes = [tokens[i, :max_len].tolist() for i in chosen]
    oracle = PlantedModes(tokenizer, modes, 1.0)
    shared = torch.tensor(
        [oracle.shared_opening(row[:n].tolist()) for row, n in zip(tokens, lengths)], dtype=torch.float64
    )
    index = torch.tensor(chosen)

    def share(per_word: float) -> float:
        log_reward = log_prior + per_word * shared
        return float(torch.exp(torch.logsumexp(log_reward[index], 0) - torch.logsumexp(log_reward, 0)))

    low, high = 0.0, 50.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if share(middle) < mode_mass else (low, middle)
    return modes, (low + high) / 2


def calls_to_reach(curve: list[dict], threshold: float) -> int | None:
    """Reward calls at the first evaluation with TV <= threshold (None: not within the budget)."""
    return next((row["reward_calls"] for row in curve if row["tv"] <= threshold), None)


def summarize(curve: list[dict]) -> dict:
    summary = {
        "final": curve[-1],
        "best_tv": min(row["tv"] for row in curve),
        **{f"calls_to_tv_{t}": calls_to_reach(curve, t) for t in THRESHOLDS},
    }
    if "modes_found" in curve[-1]:
        most = max(row["modes_found"] for row in curve)
        summary["most_modes_found"] = most
        summary["calls_to_most_modes"] = next(row["reward_calls"] for row in curve if row["modes_found"] == most)
    return summary


def run_ours(
    prior: str,
    oracle: str,
    vocab_size: int,
    max_len: int,
    policy: str,
    loss: str,
    batch_size: int,
    reward_calls: int,
    eval_every: int,
    seed: int,
    lr: float,
    lr_z: float,
    d_model: int,
    lr_schedule: str,
    extra_flags: list[str] = (),
    planted: tuple[list[list[int]], float] | None = None,
) -> tuple[list[dict], object, object]:
    """Train with train.py's loop; returns (the exact-evaluation curve, the target's log R table, the modes'
    indices or None). `planted` = (modes, per_word) replaces the oracle by PlantedModes."""
    import torch

    import train
    from evaluation import exact_distribution_metrics
    from gflownet_policy import enumerate_sequences

    tokens, lengths = enumerate_sequences(vocab_size, 1, max_len)
    flags = [
        "--prior-model",
        prior,
        "--oracle",
        "hf",
        "--oracle-model",
        oracle,
        "--target-response",
        "a b",
        "--policy",
        policy,
        "--loss",
        loss,
        "--max-len",
        str(max_len),
        "--batch-size",
        str(batch_size),
        "--epochs",
        str(reward_calls // batch_size),
        "--lr",
        str(lr),
        "--lr-z",
        str(lr_z),
        "--d-model",
        str(d_model),
        "--num-layers",
        "2",
        "--save-every",
        "1000000",
        "--no-progress",
        "--device",
        "cpu",
        "--seed",
        str(seed),
        "--lr-schedule",
        lr_schedule,
        *extra_flags,
    ]
    if policy == "lora":
        flags += ["--lora-target-modules", "c_attn", "c_proj", "c_fc"]
    curve: list[dict] = []
    state = {"train_seconds": 0.0, "since": time.time()}
    table = {}

    def evaluate(reward_calls_so_far: int, sampled: int, policy_model, log_z_value: float | None) -> None:
        state["train_seconds"] += time.time() - state["since"]
        with torch.no_grad():
            metrics = exact_distribution_metrics(
                policy_model.log_pf(tokens, lengths), table["log_reward"], table.get("modes")
            )
        curve.append(
            {
                "reward_calls": reward_calls_so_far,
                "sampled_x": sampled,
                "seconds": round(state["train_seconds"], 2),
                **metrics,
                "log_z": log_z_value,
                "log_z_error": None if log_z_value is None else abs(log_z_value - metrics["true_log_Z"]),
            }
        )
        state["since"] = time.time()

    def on_start(policy_model, reward_model) -> None:
        if planted is not None:  # the oracle the flags built (for its tokenizer and settings) gives way to the modes
            reward_model.oracle = PlantedModes(reward_model.tokenizer, *planted)
            rows = [tuple(row[:n].tolist()) for row, n in zip(tokens, lengths)]
            table["modes"] = torch.tensor([rows.index(tuple(mode)) for mode in planted[0]])
        with torch.no_grad():
            table["log_reward"] = reward_model(tokens, lengths).log_reward
        # the enumeration is the benchmark's, not training's: it neither counts nor answers training's calls
        reward_model.forget_evaluations()
        evaluate(0, 0, policy_model, None)  # log Z is only initialised from the first batch

    def on_epoch(metrics: dict, policy_model, log_z) -> None:
        # Every reward evaluation counts, modified SubTB's prefixes included; the budget is in sampled x
        sampled = metrics["epoch"] * batch_size
        if sampled % eval_every == 0 or sampled >= reward_calls - batch_size + 1:
            value = log_z().item() if loss != "vargrad" else metrics["train/log_Z"]
            evaluate(metrics["train/reward_calls"], sampled, policy_model, value)

    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        train.train(
            train.build_parser().parse_args(flags + ["--output-dir", out]), on_start=on_start, on_epoch=on_epoch
        )
    return curve, table["log_reward"], table.get("modes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny target and budget: checks the script runs")
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["6x5", "6x6"],
        help="VxL: V words, lengths 1..L (6x5 = 9,330 sequences, 6x6 = 55,986)",
    )
    parser.add_argument("--losses", nargs="+", default=["tb", "subtb", "modified-subtb", "vargrad"])
    parser.add_argument("--policies", nargs="+", default=["transformer", "lora"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reward-calls", type=int, default=192_000, help="budget per run")
    parser.add_argument("--eval-every", type=int, default=6_400, help="reward calls between exact evaluations")
    parser.add_argument(
        "--lr-schedule",
        default="cosine",
        choices=["constant", "cosine"],
        help="for every run, ours and torchgfn's (cosine decays to 0.1x)",
    )
    parser.add_argument("--transformer-lr", type=float, default=3e-3)
    parser.add_argument("--lora-lr", type=float, default=1e-2)
    parser.add_argument(
        "--torchgfn-lrs",
        type=float,
        nargs="+",
        default=[1e-3, 3e-3],
        help="torchgfn TB is run at each; the comparison uses the best",
    )
    parser.add_argument(
        "--train-flags",
        default="",
        help='more train.py flags for our runs, e.g. "--d-model 128 --max-grad-norm 0" (they win)',
    )
    parser.add_argument(
        "--torchgfn-hidden-dim", type=int, default=256, help="width of torchgfn's MLP (2 hidden layers)"
    )
    parser.add_argument("--no-torchgfn", action="store_true", help="skip the torchgfn baseline")
    parser.add_argument("--target-kind", choices=["random", "modes"], default="random", help="see the docstring")
    parser.add_argument("--modes", type=int, default=4, help="--target-kind modes: how many planted modes")
    parser.add_argument("--mode-mass", type=float, default=0.8, help="--target-kind modes: their share of R")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: runs are comparable)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--plot", default=None, help="PNG of TV against reward calls (needs matplotlib)")
    parser.add_argument(
        "--plot-from",
        nargs="+",
        default=None,
        metavar="JSON",
        help="only draw --plot from earlier --output files (e.g. one per target, run in parallel)",
    )
    args = parser.parse_args()
    if args.plot_from:
        targets = []
        for path in args.plot_from:
            with open(path) as f:
                targets += json.load(f)["targets"]
        plot({"targets": targets}, args.plot or "exact_target.png")
        return
    if args.quick:
        args.targets, args.reward_calls, args.eval_every, args.batch_size = ["3x3"], 256, 128, 32
    if not args.no_torchgfn:
        try:
            import gfn  # noqa: F401
        except ImportError:
            raise SystemExit(
                "error: torchgfn is not installed (see benchmarks/torchgfn_baseline.py) or pass --no-torchgfn"
            )
    import torch

    torch.set_num_threads(args.threads)
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
        "batch_size": args.batch_size,
        "reward_calls": args.reward_calls,
        "lr_schedule": args.lr_schedule,
        "train_flags": args.train_flags,
        "target_kind": args.target_kind,
        "targets": [],
    }
    for spec in args.targets:
        vocab_size, max_len = (int(n) for n in spec.split("x"))
        target = {"vocab_size": vocab_size, "max_len": max_len, "runs": []}
        with tempfile.TemporaryDirectory() as folder:
            prior, oracle = build_target(folder, vocab_size)
            log_reward = modes = planted = None
            if args.target_kind == "modes":
                planted = plant_modes(prior, vocab_size, max_len, args.modes, args.mode_mass, args.seed)
                target["modes"], target["per_word"] = planted[0], round(planted[1], 4)
            for policy in args.policies:
                for loss in args.losses:
                    started = time.time()
                    lr = args.lora_lr if policy == "lora" else args.transformer_lr
                    curve, log_reward, modes = run_ours(
                        prior,
                        oracle,
                        vocab_size,
                        max_len,
                        policy,
                        loss,
                        args.batch_size,
                        args.reward_calls,
                        args.eval_every,
                        args.seed,
                        lr,
                        0.1,
                        32,
                        args.lr_schedule,
                        shlex.split(args.train_flags),
                        planted,
                    )
                    target["runs"].append(
                        {
                            "system": "ours",
                            "policy": policy,
                            "loss": loss,
                            "lr": lr,
                            "wall_seconds": round(time.time() - started, 1),
                            **summarize(curve),
                            "curve": curve,
                        }
                    )
                    print(f"{spec} {policy} {loss}: TV {curve[-1]['tv']:.4f}", file=sys.stderr)
        target["num_sequences"] = len(log_reward)
        target["true_log_Z"] = float(torch.logsumexp(log_reward.double(), 0))
        target["log_reward_range"] = [float(log_reward.min()), float(log_reward.max())]
        if not args.no_torchgfn:
            from torchgfn_baseline import run_torchgfn_tb

            for lr in args.torchgfn_lrs:
                started = time.time()
                curve = run_torchgfn_tb(
                    log_reward,
                    vocab_size,
                    max_len,
                    args.batch_size,
                    args.reward_calls,
                    args.eval_every,
                    seed=args.seed,
                    lr=lr,
                    lr_schedule=args.lr_schedule,
                    hidden_dim=args.torchgfn_hidden_dim,
                    modes=modes,
                )
                target["runs"].append(
                    {
                        "system": "torchgfn",
                        "policy": f"mlp{args.torchgfn_hidden_dim}",
                        "loss": "tb",
                        "lr": lr,
                        "wall_seconds": round(time.time() - started, 1),
                        **summarize(curve),
                        "curve": curve,
                    }
                )
                print(f"{spec} torchgfn tb lr {lr}: TV {curve[-1]['tv']:.4f}", file=sys.stderr)
        target["comparison"] = compare_with_torchgfn(target["runs"])
        result["targets"].append(target)
    text = json.dumps(result, indent=1)
    if args.output:
        from durable_files import atomic_write

        atomic_write(args.output, lambda f: f.write(text.encode()))
    if args.plot:
        plot(result, args.plot)
    print(text)


def compare_with_torchgfn(runs: list[dict]) -> list[dict]:
    """Reward calls to reach each TV for every one of our runs, against torchgfn's TB at its best learning rate
    (ratio > 1: we need fewer calls; None where a run did not get there within the budget)."""
    baselines = [run for run in runs if run["system"] == "torchgfn"]
    rows = []
    for run in runs:
        if run["system"] != "ours":
            continue
        row = {"policy": run["policy"], "loss": run["loss"]}
        for t in THRESHOLDS:
            reached = [b[f"calls_to_tv_{t}"] for b in baselines if b[f"calls_to_tv_{t}"] is not None]
            ours, theirs = run[f"calls_to_tv_{t}"], min(reached) if reached else None
            row[f"calls_to_tv_{t}"] = ours
            row[f"torchgfn_calls_to_tv_{t}"] = theirs
            row[f"ratio_torchgfn_over_ours_tv_{t}"] = round(theirs / ours, 2) if ours and theirs else None
        rows.append(row)
    return rows


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = result["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(6.5 * len(targets), 4.5), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for run in target["runs"]:
            xs = [row["reward_calls"] for row in run["curve"]]
            ys = [row["tv"] for row in run["curve"]]
            style = "--" if run["system"] == "torchgfn" else ("-" if run["policy"] == "transformer" else ":")
            label = (
                f"torchgfn TB (MLP), lr {run['lr']}"
                if run["system"] == "torchgfn"
                else f"{run['policy']} {run['loss']}"
            )
            ax.plot(xs, ys, style, label=label)
        for t in THRESHOLDS:
            ax.axhline(t, color="grey", linewidth=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("reward calls")
        ax.set_ylabel("exact total variation")
        ax.set_title(f"V={target['vocab_size']}, L<={target['max_len']} ({target['num_sequences']:,} sequences)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
