"""Run a grid of settings as separate training runs and print a comparison table.

Each grid point is one call of the training loop (train.train) with its own output directory
(--output-dir/<point name>) and W&B group (--wandb-group, default the sweep's directory name), one after the
other in this process. The table compares the last --tail epochs of each run (from its metrics file) and, for the
contradiction task, the share of questions whose answers the NLI model judged contradictory.

  python sweep.py --grid contradiction-threshold=-6,-4 likelihood-weight=0.5,1.0 -- \\
      --task contradiction --policy lora --prior-model PATH --nli-model PATH --epochs 100 --output-dir out/sweep
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import statistics
import sys

from errors import OneLineErrorParser, UserError, run_cli


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        flag, sep, values = item.partition("=")
        if not sep or not flag or not values:
            raise UserError(f"--grid entries look like flag-name=v1,v2 (got {item!r})")
        grid.append((flag.lstrip("-"), values.split(",")))
    return grid


def point_name(point: tuple[tuple[str, str], ...]) -> str:
    return "_".join(f"{flag}={value}" for flag, value in point).replace("/", "-")


def summarise(output_dir: str, task: str, tail: int) -> dict:
    """The last `tail` epochs' means of the losses, every reward term and the diversity metrics; for the
    contradiction task also the rates of `sample.py --task contradiction` over the questions of the first and of
    the last `tail` epochs (the trend within the run)."""
    with open(os.path.join(output_dir, f"metrics_{task}.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    trained = [m for m in metrics if "train/loss" in m][-tail:]
    summary = {"epochs": metrics[-1]["epoch"] if metrics else 0}
    terms = sorted({k for m in trained for k in m if k.startswith("train/log_") and k.endswith("_mean")})
    for key in ("train/loss", *terms, "eval/unique_fraction", "eval/distinct_2"):
        values = [m[key] for m in trained if key in m]
        summary[key] = statistics.mean(values) if values else float("nan")
    if task == "contradiction":
        from contradiction_reward import contradicts  # lazily: torch
        from contradiction_reward import on_topic as is_on_topic

        with open(os.path.join(output_dir, "samples_contradiction.jsonl")) as f:
            samples = [json.loads(line) for line in f if line.strip()]
        first = [s for s in samples if s["epoch"] <= tail]
        last = [s for s in samples if s["epoch"] > summary["epochs"] - tail]

        def rate(rows: list[dict], test) -> float:
            return sum(map(test, rows)) / len(rows) if rows else float("nan")

        def on_topic(s: dict) -> bool:  # as the contradiction evaluation
            return is_on_topic(s["x"], s.get("subject", ""), s.get("log_related", 0.0))

        def on_topic_contradiction(s: dict) -> bool:
            return on_topic(s) and contradicts(s["log_contradiction"])

        summary["contradiction_rate"] = rate(last, lambda s: contradicts(s["log_contradiction"]))
        summary["on_topic_rate"] = rate(last, on_topic)
        summary["first_on_topic_contradiction_rate"] = rate(first, on_topic_contradiction)
        summary["on_topic_contradiction_rate"] = rate(last, on_topic_contradiction)
        summary["question_rate"] = rate(last, lambda s: "?" in s["x"])
    return summary


def format_table(rows: list[tuple[str, dict]]) -> str:
    keys = [k for k in rows[0][1] if k != "epochs"] if rows else []
    width = max([len(name) for name, _ in rows] + [5])
    lines = [f"{'run':<{width}} " + " ".join(f"{k.split('/')[-1][-16:]:>16}" for k in keys)]
    for name, summary in rows:
        lines.append(f"{name:<{width}} " + " ".join(f"{summary[k]:>16.3f}" for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import train  # here, not at the top: a bad sweep flag is reported before torch loads

    argv = sys.argv[1:] if argv is None else argv
    ours, train_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", nargs="+", required=True, help="flag=v1,v2 ... (training flags without the --)")
    parser.add_argument("--tail", type=int, default=10, help="epochs averaged for the table")
    parser.add_argument("--wandb-group", default=None)
    args = parser.parse_args(ours)

    def body() -> None:
        grid = parse_grid(args.grid)
        base = train.build_parser().parse_args(train_argv)
        sweep_dir = base.output_dir
        rows = []
        for values in itertools.product(*[[(flag, v) for v in options] for flag, options in grid]):
            name = point_name(values)
            run_argv = list(train_argv) + [item for flag, value in values for item in (f"--{flag}", value)]
            run_argv += ["--output-dir", os.path.join(sweep_dir, name)]
            run_args = train.build_parser().parse_args(run_argv)
            if run_args.wandb_project or run_args.wandb_mode not in (None, "disabled"):
                os.environ["WANDB_RUN_GROUP"] = args.wandb_group or os.path.basename(os.path.abspath(sweep_dir))
            print(f"=== {name}", file=sys.stderr, flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                train.train(run_args)
            rows.append((name, summarise(run_args.output_dir, run_args.task, args.tail)))
        table = format_table(rows)
        print(table)
        with open(os.path.join(sweep_dir, "sweep_summary.json"), "w") as f:
            json.dump({name: summary for name, summary in rows}, f, indent=2)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
