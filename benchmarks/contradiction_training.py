"""The contradiction task's training against its baseline at the same answer calls (issue 21).

The trained sampler is read from its own samples file (every question it was trained on was answered once: one
answer call per row); the baseline is the untrained sampler with the same question prompt, sampled and judged by
the same reward (`sample.py --samples-per-subject K` on the `--epochs 0` checkpoint: one answer call per row), with
as many rows as training answered. For each: the on-topic contradiction rate (the judge accepts the answer, the
question names the subject and the answer is related to the fact: `contradicts` and `on_topic` of
contradiction_reward.py), the same for questions alone ("?"), the question rate and the unique fraction, for the
training run by quarter, the last quarter being the issue's measure; per subject too.

  python train.py --task contradiction ... --epochs 0 --output-dir out/contra_untrained
  python sample.py --checkpoint out/contra_untrained/checkpoint_gfn_contradiction_epoch0.pt --samples-per-subject 64 \\
      --output out/contra_untrained/baseline_questions.jsonl
  python train.py --task contradiction ... --epochs 96 --output-dir out/contra_run
  python benchmarks/contradiction_training.py --run out/contra_run \\
      --baseline out/contra_untrained/baseline_questions.jsonl --output benchmarks/results/contradiction_training.json
  python benchmarks/contradiction_training.py --run out/contra_run_s0 out/contra_run_s1 out/contra_run_s2 ...  # seeds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rates(rows: list[dict]) -> dict:
    """Rates over rows of {"question", "subject", "log_contradiction", "log_related"}."""
    from contradiction_reward import contradicts, on_topic

    n = len(rows) or 1
    accepted = [contradicts(r["log_contradiction"]) for r in rows]
    on_topic_accepted = [a and on_topic(r["question"], r["subject"], r["log_related"]) for a, r in zip(accepted, rows)]
    return {
        "answer_calls": len(rows),
        "contradiction_rate": round(sum(accepted) / n, 4),
        "on_topic_contradiction_rate": round(sum(on_topic_accepted) / n, 4),
        # the same, asked as a question ("?"): a statement the answerer echoes back is not a question
        "on_topic_contradicting_question_rate": round(
            sum(a and "?" in r["question"] for a, r in zip(on_topic_accepted, rows)) / n, 4
        ),
        "question_rate": round(sum("?" in r["question"] for r in rows) / n, 4),
        "unique_fraction": round(len({r["question"] for r in rows}) / n, 4),
    }


def per_subject(rows: list[dict]) -> dict[str, dict]:
    subjects: dict[str, list[dict]] = {}
    for row in rows:
        subjects.setdefault(row["subject"], []).append(row)
    return {subject: rates(part) for subject, part in sorted(subjects.items())}


def training_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "samples_contradiction.jsonl"), encoding="utf-8") as f:
        return [{**r, "question": r["x"]} for r in map(json.loads, f) if r.get("epoch")]


def baseline_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def report(run_dir: str, baseline_path: str) -> dict:
    trained = training_rows(run_dir)
    epochs = max(r["epoch"] for r in trained)
    quarter = max(1, epochs // 4)
    quarters = [[r for r in trained if q * quarter < r["epoch"] <= (q + 1) * quarter] for q in range(4)]
    baseline = baseline_rows(baseline_path)[: len(trained)]  # at most the training run's answer calls
    last = quarters[-1]
    with open(os.path.join(run_dir, "run_contradiction.json"), encoding="utf-8") as f:
        run_info = json.load(f)
    baseline_rates, quarter_rates = rates(baseline), [rates(q) for q in quarters]
    summary = {
        "benchmark": "contradiction_training",
        "date": time.strftime("%Y-%m-%d"),
        "run": run_dir,
        "epochs": epochs,
        "answer_calls": len(trained),
        "baseline_answer_calls": len(baseline),
        "baseline_on_topic_contradiction_rate": baseline_rates["on_topic_contradiction_rate"],
        "trained_on_topic_contradiction_rate": quarter_rates[-1]["on_topic_contradiction_rate"],
        "baseline": baseline_rates,
        "trained_by_quarter": quarter_rates,
        "trained_last_quarter_per_subject": per_subject(last),
        "baseline_per_subject": per_subject(baseline),
        "last_questions": [
            {"subject": r["subject"], "question": r["question"], "answer": r["y"], "log_c": r["log_contradiction"]}
            for r in last[-10:]
        ],
        "flags": run_info.get("args", run_info),
    }
    return summary


def ceiling_table(runs: list[dict], ceiling: dict[str, float]) -> dict:
    """Per subject asked about: its ceiling (contradiction_ceiling.py's on-topic rate under the training judge),
    the baseline's rate and the trained last quarter's per seed; and both rates over the rows of the subjects whose
    ceiling is at least 0.5 taken together (the issue's measure)."""
    ceiling = {s: c for s, c in ceiling.items() if s in runs[0]["baseline_per_subject"]}  # the subjects asked about
    high = sorted(s for s, c in ceiling.items() if c >= 0.5)

    def pooled(per_subject: dict[str, dict]) -> float:
        calls = sum(per_subject[s]["answer_calls"] for s in high if s in per_subject)
        hits = sum(
            per_subject[s]["on_topic_contradiction_rate"] * per_subject[s]["answer_calls"]
            for s in high
            if s in per_subject
        )
        return round(hits / calls, 4) if calls else 0.0

    return {
        "subjects_with_ceiling_at_least_half": high,
        "baseline_on_those": pooled(runs[0]["baseline_per_subject"]),
        "trained_last_quarter_on_those_by_seed": [pooled(r["trained_last_quarter_per_subject"]) for r in runs],
        "per_subject": {
            s: {
                "ceiling": ceiling[s],
                "baseline": runs[0]["baseline_per_subject"].get(s, {}).get("on_topic_contradiction_rate", 0.0),
                "trained_last_quarter_by_seed": [
                    r["trained_last_quarter_per_subject"].get(s, {}).get("on_topic_contradiction_rate", 0.0)
                    for r in runs
                ],
            }
            for s in sorted(ceiling)
        },
    }


def load_ceiling(path: str) -> dict[str, float]:
    """Per-subject ceiling from contradiction_ceiling.py's output, under the judge setting training used."""
    with open(path, encoding="utf-8") as f:
        judged = json.load(f)["training_judge"]["per_subject"]
    return {subject: entry["on_topic_contradiction_rate"] for subject, entry in judged.items()}


def seeds_report(run_dirs: list[str], baseline_path: str) -> dict:
    """Several seeds of one setting: each run's report, and the mean and spread of the measures the issue names
    (the last quarter's on-topic contradiction rate, overall and per subject; the question rate by quarter)."""
    runs = [report(run_dir, baseline_path) for run_dir in run_dirs]
    last = [r["trained_on_topic_contradiction_rate"] for r in runs]
    subjects = sorted({s for r in runs for s in r["trained_last_quarter_per_subject"]})

    def spread(values: list[float]) -> dict:
        return {
            "by_seed": values,
            "mean": round(statistics.mean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
        }

    return {
        "benchmark": "contradiction_training",
        "date": time.strftime("%Y-%m-%d"),
        "seeds": len(runs),
        "answer_calls": [r["answer_calls"] for r in runs],
        "baseline_on_topic_contradiction_rate": runs[0]["baseline_on_topic_contradiction_rate"],
        "trained_on_topic_contradiction_rate": round(statistics.mean(last), 4),
        "trained_on_topic_contradiction_rate_by_seed": spread(last),
        "question_rate_by_quarter": [
            spread([r["trained_by_quarter"][q]["question_rate"] for r in runs]) for q in range(4)
        ],
        "on_topic_contradicting_question_rate_last_quarter": spread(
            [r["trained_by_quarter"][-1]["on_topic_contradicting_question_rate"] for r in runs]
        ),
        "unique_fraction_last_quarter": spread([r["trained_by_quarter"][-1]["unique_fraction"] for r in runs]),
        "last_quarter_per_subject": {
            s: spread(
                [r["trained_last_quarter_per_subject"].get(s, {}).get("on_topic_contradiction_rate", 0.0) for r in runs]
            )
            for s in subjects
        },
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run", required=True, nargs="+", help="a contradiction training run's output directory (several: seeds)"
    )
    parser.add_argument("--baseline", required=True, help="sample.py's questions file for the untrained checkpoint")
    parser.add_argument(
        "--ceiling",
        default=None,
        help="contradiction_ceiling.py's output: adds each subject's ceiling beside its rates, and the rates on the "
        "subjects whose ceiling is at least 0.5",
    )
    parser.add_argument("--output", default=None, help="JSON file (default: print)")
    args = parser.parse_args(argv)
    if len(args.run) == 1:
        summary = report(args.run[0], args.baseline)
        compact = {k: summary[k] for k in ("answer_calls", "baseline", "trained_by_quarter")}
        runs = [summary]
    else:
        summary = seeds_report(args.run, args.baseline)
        compact = {k: v for k, v in summary.items() if k != "runs"}
        runs = summary["runs"]
    if args.ceiling:
        summary["ceiling"] = compact["ceiling"] = ceiling_table(runs, load_ceiling(args.ceiling))
    text = json.dumps(summary, indent=1) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    print(json.dumps(compact, indent=1))


if __name__ == "__main__":
    main()
