"""resurrect.py on a large synthetic samples file: wall time and peak memory against rows.

The rows are sentences of random words (a fixed vocabulary of 2,000), 20% of them exact or near copies of earlier
ones, in the samples-file format train.py writes. resurrect.py runs in a child process (--no-reference: the
reference model's cost is a forward pass per kept row, measured elsewhere) with its worker processes; memory is
the peak of their summed proportional set size (PSS, /proc/PID/smaps_rollup, sampled every 0.1 s: shared pages
counted once), beside the largest single process's peak RSS.

  python benchmarks/resurrect_scale.py --rows 1000000
  python benchmarks/resurrect_scale.py --quick            # 2,000 rows: the smoke test
"""

from __future__ import annotations

import argparse
import glob
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


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc)."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in glob.glob(f"/proc/{tree[index]}/task/*/children"):
            try:
                with open(task) as f:
                    tree += [int(child) for child in f.read().split()]
            except OSError:
                pass
        index += 1
    return tree


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0  # the process ended between listing and reading


def run(rows: int, workers: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        samples = os.path.join(folder, "samples_raw.jsonl")
        write_samples(samples, rows)
        size = os.path.getsize(samples)
        command = [sys.executable, os.path.join(ROOT, "resurrect.py"), samples, "-o", os.path.join(folder, "out"),
                   "--no-reference", "--quiet"]  # fmt: skip
        if workers is not None:
            command += ["--workers", str(workers)]
        started = time.time()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        peak_pss = 0
        while proc.poll() is None:
            peak_pss = max(peak_pss, sum(pss_kib(pid) for pid in process_tree(proc.pid)))
            time.sleep(0.1)
        seconds = time.time() - started
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(stderr[-2000:])
        with open(os.path.join(folder, "out", "summary.json")) as f:
            counts = json.load(f)["counts"]
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    return {
        "rows": rows,
        "file_mib": round(size / 2**20, 1),
        "seconds": round(seconds, 1),
        "rows_per_second": round(rows / seconds),
        "peak_rss_mib": round(peak_kib / 1024),
        "peak_total_pss_mib": round(peak_pss / 1024),
        "workers": workers,
        "counts": counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=None, help="resurrect.py --workers (default: its own)")
    args = parser.parse_args()
    result = run(2000 if args.quick else args.rows, args.workers)
    print(json.dumps({"benchmark": "resurrect_scale", "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
                      **result}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
