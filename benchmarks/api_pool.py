"""API pool benchmark: achieved request rate against the ideal workers / latency, with and without 10% 429s,
the wall time of a training epoch with a remote oracle, prefetch on versus off, and adaptive versus fixed
concurrency against servers with 1, 4 and 64 slots (requests beyond the slots queue FIFO, as on llama.cpp).

Everything runs against the local OpenAI-protocol test server on 127.0.0.1 (tests/openai_test_server.py).
Prints one JSON object.

  python benchmarks/api_pool.py                      # the full run reported in BENCHMARKS.md
  python benchmarks/api_pool.py --quick              # seconds; what the test suite runs
  python benchmarks/api_pool.py --only adaptive      # just the adaptive-concurrency comparison
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("WANDB_MODE", "disabled")

from api_client import OpenAIChatOracle, RetryPolicy  # noqa: E402
from openai_test_server import OpenAITestServer, by_body_hash, rate_limited  # noqa: E402
from reward_oracle import TASKS  # noqa: E402


def _serve(
    conn, latency_s: float, fault_fraction: float, slots: int | None = None, honour_idempotency: bool = True
) -> None:
    """Child process: the server gets its own interpreter, as a real API would be on another machine, so the
    measurement is of the client, not of two programs sharing one GIL."""
    with OpenAITestServer(
        api_key="bench-key", latency_s=latency_s, slots=slots, honour_idempotency=honour_idempotency
    ) as server:
        if fault_fraction:
            # a fraction of requests (by a hash of body and attempt) answered 429 without retry-after
            server.fail_always(by_body_hash(fault_fraction, rate_limited(retry_after_ms=None)))
        conn.send(server.base_url)
        while True:  # "peek": the counters; "take": the counters, then reset them; "stop"
            command = conn.recv()
            conn.send(
                {
                    "peak_in_flight": server.peak_in_flight,
                    "peak_in_slots": server.peak_in_slots,
                    "billed": server.billed_total(),
                    "in_flight": server.in_flight,
                }
            )
            if command == "take":
                server.reset_stats()
            elif command == "stop":
                break


class ServerStats(dict):
    """Filled with the server's counters when the block ends; peek() and take() ask for them now."""

    def __init__(self, conn) -> None:
        super().__init__()
        self.conn = conn

    def peek(self) -> dict:
        self.conn.send("peek")
        return self.conn.recv()

    def take(self) -> dict:
        """The counters since the last take(), once the server has finished every request it holds."""
        while self.peek()["in_flight"]:
            time.sleep(0.02)
        self.conn.send("take")
        return self.conn.recv()


@contextlib.contextmanager
def remote_server(
    latency_s: float, fault_fraction: float = 0.0, slots: int | None = None, honour_idempotency: bool = True
):
    """Yields (base_url, stats): stats is filled with the server's counters when the block ends."""
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(child, latency_s, fault_fraction, slots, honour_idempotency)
    )
    process.start()
    stats = ServerStats(parent)
    try:
        yield parent.recv(), stats
    finally:
        parent.send("stop")
        stats.update(parent.recv())
        process.join()


def pool_rate(
    workers: int, latency_s: float, requests: int, fault_fraction: float = 0.0, adaptive: bool = True
) -> dict:
    with remote_server(latency_s, fault_fraction) as (base_url, server_stats):
        achieved, ideal, ok, elapsed, stats = _drive_pool(base_url, workers, latency_s, requests, adaptive)
    return {
        "workers": workers,
        "mode": "adaptive" if adaptive else "fixed",
        "final_limit": stats["concurrency_limit"],
        "latency_s": latency_s,
        "requests": requests,
        "ok": ok,
        "seconds": round(elapsed, 3),
        "achieved_rps": round(achieved, 1),
        "ideal_rps": round(ideal, 1),
        "fraction_of_ideal": round(achieved / ideal, 3),
        "retries": stats["retries"],
        "peak_in_flight": server_stats["peak_in_flight"],
        "billed": server_stats["billed"],
    }


def _drive_pool(base_url: str, workers: int, latency_s: float, requests: int, adaptive: bool = True):
    oracle = OpenAIChatOracle(
        "gpt-4o-mini",
        TASKS["raw"],
        max_tokens=8,
        max_workers=workers,
        base_url=base_url,
        retry=RetryPolicy(max_attempts=20, base_delay_s=0.05),
        adaptive_concurrency=adaptive,
    )
    oracle.score([f"warm {i}" for i in range(workers)])  # open the connections first
    texts = [f"benchmark request {i}" for i in range(requests)]
    started = time.perf_counter()
    results = oracle.score(texts)
    elapsed = time.perf_counter() - started
    stats = oracle.stats()
    oracle.close()
    ok = sum(r.valid for r in results)
    return ok / elapsed, workers / latency_s, ok, elapsed, stats


def concurrency_run(
    base_url: str,
    server_stats: ServerStats,
    slots: int,
    adaptive: bool,
    latency_s: float,
    timeout_s: float,
    batches: int,
    batch_size: int = 8,
    workers: int = 8,
    seed: int = 0,
) -> dict:
    """`batches` batches of `batch_size` requests, each sent once the previous batch is answered (as the training
    loop does), by a new client. The client times out after timeout_s and retries with the default full-jitter
    backoff scaled to the latency (base 2.5 × latency_s: 0.5 s, the default, at 0.2 s)."""
    server_stats.take()  # start from an idle server and fresh counters
    retry = RetryPolicy(base_delay_s=2.5 * latency_s, rng=random.Random(seed))
    oracle = OpenAIChatOracle(
        "gpt-4o-mini",
        TASKS["raw"],
        max_tokens=8,
        max_workers=workers,
        base_url=base_url,
        timeout_s=timeout_s,
        retry=retry,
        adaptive_concurrency=adaptive,
    )
    batch_seconds, ok = [], 0
    started = time.perf_counter()
    for batch in range(batches):
        t = time.perf_counter()
        results = oracle.score([f"seed {seed} batch {batch} request {i}" for i in range(batch_size)])
        batch_seconds.append(time.perf_counter() - t)
        ok += sum(r.valid for r in results)
    elapsed = time.perf_counter() - started
    stats, limit = oracle.stats(), oracle.concurrency.stats()
    oracle.close()
    server = server_stats.take()  # after the abandoned requests still queued have been computed too
    return {
        "slots": slots,
        "mode": "adaptive" if adaptive else "fixed",
        "requests": batches * batch_size,
        "ok": ok,
        "failed": stats["failed"],
        "seconds": round(elapsed, 3),
        "batch_seconds": [round(b, 3) for b in batch_seconds],
        "retries": stats["retries"],
        "timeouts": limit["overloads"],
        "final_limit": limit["limit"],
        "mean_limit": round(limit["mean_limit"], 2),
        "decreases": limit["decreases"],
        "client_peak_in_flight": limit["peak_in_flight"],
        "server_peak_in_slots": server["peak_in_slots"],
        "server_answers": server["billed"],
    }


def concurrency_comparison(
    slot_counts: list[int], latency_s: float, timeout_s: float, batches: int, repeats: int
) -> dict:
    """Each slot count gets one server (it ignores Idempotency-Key, as llama.cpp does: a retry is new work);
    each trial a new client, once the server is idle."""
    runs = []
    for slots in slot_counts:
        by_mode: dict[bool, list[dict]] = {True: [], False: []}
        with remote_server(latency_s, slots=slots, honour_idempotency=False) as (base_url, server_stats):
            for seed in range(repeats):  # alternate the modes, so that drift in the machine's load hits both
                for adaptive in (True, False):
                    by_mode[adaptive].append(
                        concurrency_run(
                            base_url, server_stats, slots, adaptive, latency_s, timeout_s, batches, seed=seed
                        )
                    )
        for adaptive, trials in by_mode.items():
            row = {key: trials[0][key] for key in ("slots", "mode", "requests")}
            for key in (
                "seconds",
                "ok",
                "failed",
                "retries",
                "timeouts",
                "final_limit",
                "mean_limit",
                "decreases",
                "client_peak_in_flight",
                "server_peak_in_slots",
                "server_answers",
            ):
                values = [trial[key] for trial in trials]
                row[key] = round(statistics.median(values), 3)
                if len(set(values)) > 1:
                    row[key + "_range"] = [min(values), max(values)]
            row["trials"] = trials
            runs.append(row)
    return {
        "latency_s": latency_s,
        "timeout_s": timeout_s,
        "batches": batches,
        "batch_size": 8,
        "workers": 8,
        "repeats": repeats,
        "runs": runs,
    }


def epoch_time(
    prefetch: bool, latency_s: float, epochs: int, model_dir: str, d_model: int, num_layers: int, max_len: int
) -> dict:
    import train

    with remote_server(latency_s) as (base_url, _), tempfile.TemporaryDirectory() as out:
        argv = [
            "--prior-model",
            model_dir,
            "--oracle",
            "openai",
            "--base-url",
            base_url,
            "--batch-size",
            "16",
            "--max-api-workers",
            "16",
            "--d-model",
            str(d_model),
            "--num-layers",
            str(num_layers),
            "--max-len",
            str(max_len),
            "--epochs",
            str(epochs),
            "--output-dir",
            out,
            "--no-progress",
            "--device",
            "cpu",
            "--no-cache",
            "--max-response-tokens",
            "8",
            "--save-every",
            str(epochs + 1),
            "--prefetch" if prefetch else "--no-prefetch",
        ]
        args = train.build_parser().parse_args(argv)
        with contextlib.redirect_stdout(io.StringIO()):
            started = time.perf_counter()
            train.train(args)
            elapsed = time.perf_counter() - started
        with open(os.path.join(out, "metrics_raw.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
    # per-epoch times from the loop's own clock, dropping the first (model warm-up) epoch
    return {
        "prefetch": prefetch,
        "epochs": epochs,
        "total_seconds": round(elapsed, 3),
        "mean_epoch_seconds": round(sum(m["train/epoch_seconds"] for m in metrics[1:]) / (len(metrics) - 1), 4),
    }


def train_step_time(model_dir: str, d_model: int, num_layers: int, max_len: int, repeats: int = 10) -> float:
    """Sampling plus one TB step with no oracle (prior only): the local part of an epoch."""
    import train

    with tempfile.TemporaryDirectory() as out:
        argv = [
            "--prior-model",
            model_dir,
            "--oracle",
            "hf",
            "--llm-weight",
            "0",
            "--batch-size",
            "16",
            "--d-model",
            str(d_model),
            "--num-layers",
            str(num_layers),
            "--max-len",
            str(max_len),
            "--epochs",
            str(repeats + 1),
            "--output-dir",
            out,
            "--no-progress",
            "--device",
            "cpu",
            "--save-every",
            "1000",
        ]
        with contextlib.redirect_stdout(io.StringIO()):
            train.train(train.build_parser().parse_args(argv))
        with open(os.path.join(out, "metrics_raw.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
    return sum(m["train/epoch_seconds"] for m in metrics[1:]) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds, small settings")
    parser.add_argument("--only", choices=["adaptive"], help="run one section only")
    args = parser.parse_args()
    os.environ["OPENAI_API_KEY"] = "bench-key"
    from conftest import bpe_tokenizer, save_tiny_gpt2

    latency = 0.1
    worker_counts = [4] if args.quick else [8, 32, 128]
    rounds = 2 if args.quick else 20
    result = {
        "benchmark": "api_pool",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "pool": [],
        "pool_10pct_429": [],
        "epoch": {},
    }
    # Adaptive versus fixed concurrency (8 workers): one slot queues 8 requests past the timeout, 4 and 64 do not.
    if args.quick:
        result["adaptive"] = concurrency_comparison([1], latency_s=0.05, timeout_s=0.25, batches=2, repeats=1)
    else:
        result["adaptive"] = concurrency_comparison([1, 4, 64], latency_s=0.2, timeout_s=1.0, batches=4, repeats=3)
    if args.only == "adaptive":
        print(json.dumps(result, indent=2))
        return
    for workers in worker_counts:
        result["pool"].append(pool_rate(workers, latency, workers * rounds))
        result["pool_10pct_429"].append(pool_rate(workers, latency, workers * rounds, fault_fraction=0.1))
    if not args.quick:  # the same with the concurrency fixed at the workers (before adaptive concurrency)
        result["pool_fixed"] = [pool_rate(w, latency, w * rounds, adaptive=False) for w in worker_counts]
        result["pool_10pct_429_fixed"] = [
            pool_rate(w, latency, w * rounds, fault_fraction=0.1, adaptive=False) for w in worker_counts
        ]
    with tempfile.TemporaryDirectory() as folder:
        model_dir = save_tiny_gpt2(folder, bpe_tokenizer())
        size = dict(d_model=64, num_layers=1, max_len=8) if args.quick else dict(d_model=256, num_layers=4, max_len=32)
        epochs = 3 if args.quick else 12
        local = train_step_time(model_dir, repeats=2 if args.quick else 10, **size)
        # API round trips about as long as the local step, and three times as long
        latencies = [0.05] if args.quick else [max(0.1, round(local, 2)), round(3 * local, 2)]
        result["epoch"] = {"policy": size, "batch_size": 16, "local_step_seconds": round(local, 4), "runs": []}
        for api_latency in latencies:
            off = epoch_time(False, api_latency, epochs, model_dir, **size)
            on = epoch_time(True, api_latency, epochs, model_dir, **size)
            result["epoch"]["runs"].append(
                {
                    "api_latency_s": api_latency,
                    "prefetch_off_epoch_s": off["mean_epoch_seconds"],
                    "prefetch_on_epoch_s": on["mean_epoch_seconds"],
                    "sum_of_parts_s": round(local + api_latency, 4),
                    "max_of_parts_s": round(max(local, api_latency), 4),
                }
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
