"""resurrect.py on a large synthetic samples file: wall time and peak memory against rows.

The rows are sentences of random words (a fixed vocabulary of 2,000), 20% of them exact or near copies of earlier
ones, in the samples-file format train.py writes. resurrect.py runs in a child process (--no-reference: the
reference model's cost is a forward pass per kept row, measured elsewhere), so its peak RSS is its own.

  python benchmarks/resurrect_scale.py --rows 1000000
  python benchmarks/resurrect_scale.py --quick            # 2,000 rows: the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_samples(path: str, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(2000)]
    kept: list[tuple[str, str]] = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            if kept and rng.random() < 0.2:
                x, y = rng.choice(kept)
                if rng.random() < 0.5:  # a near copy: one word of y changed
                    words = y.split()
                    words[rng.randrange(len(words))] = rng.choice(vocabulary)
                    y = " ".join(words)
            else:
                x = " ".join(rng.choices(vocabulary, k=rng.randint(3, 10)))
                y = " " + " ".join(rng.choices(vocabulary, k=rng.randint(8, 24)))
                if len(kept) < 10000:
                    kept.append((x, y))
            log_prior, log_likelihood = -rng.uniform(10, 80), -rng.uniform(1, 40)
            record = {"epoch": i // 16 + 1, "x": x, "token_ids": list(range(len(x.split()))), "y": y,
                      "y_token_ids": list(range(len(y.split()))), "log_prior": log_prior,
                      "log_likelihood": log_likelihood, "log_reward": log_prior + log_likelihood, "valid": True,
                      "error": None, "truncated": False, "response_tokens": len(y.split())}  # fmt: skip
            f.write(json.dumps(record) + "\n")


def run(rows: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        samples = os.path.join(folder, "samples_raw.jsonl")
        write_samples(samples, rows)
        size = os.path.getsize(samples)
        started = time.time()
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "resurrect.py"), samples, "-o", os.path.join(folder, "out"),
             "--no-reference", "--quiet"],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        seconds = time.time() - started
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        with open(os.path.join(folder, "out", "summary.json")) as f:
            counts = json.load(f)["counts"]
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    return {
        "rows": rows,
        "file_mib": round(size / 2**20, 1),
        "seconds": round(seconds, 1),
        "rows_per_second": round(rows / seconds),
        "peak_rss_mib": round(peak_kib / 1024),
        "counts": counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(2000 if args.quick else args.rows)
    print(json.dumps({"benchmark": "resurrect_scale", "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
                      **result}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
