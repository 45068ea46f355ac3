"""API pool benchmark: achieved request rate against the ideal workers / latency, with and without 10% 429s,
and the wall time of a training epoch with a remote oracle, prefetch on versus off.

Everything runs against the local OpenAI-protocol test server on 127.0.0.1 (tests/openai_test_server.py).
Prints one JSON object.

  python benchmarks/api_pool.py                      # the full run reported in BENCHMARKS.md
  python benchmarks/api_pool.py --quick              # seconds; what the test suite runs
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("WANDB_MODE", "disabled")

from api_client import OpenAIChatOracle, RetryPolicy  # noqa: E402
from openai_test_server import OpenAITestServer, by_body_hash, rate_limited  # noqa: E402
from reward_oracle import TASKS  # noqa: E402


def _serve(conn, latency_s: float, fault_fraction: float) -> None:
    """Child process: the server gets its own interpreter, as a real API would be on another machine, so the
    measurement is of the client, not of two programs sharing one GIL."""
    with OpenAITestServer(api_key="bench-key", latency_s=latency_s) as server:
        if fault_fraction:
            # a fraction of requests (by a hash of body and attempt) answered 429 without retry-after
            server.fail_always(by_body_hash(fault_fraction, rate_limited(retry_after_ms=None)))
        conn.send(server.base_url)
        conn.recv()  # until told to stop
        conn.send({"peak_in_flight": server.peak_in_flight, "billed": server.billed_total()})


@contextlib.contextmanager
def remote_server(latency_s: float, fault_fraction: float = 0.0):
    """Yields (base_url, stats): stats is filled with the server's counters when the block ends."""
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(child, latency_s, fault_fraction))
    process.start()
    stats: dict = {}
    try:
        yield parent.recv(), stats
    finally:
        parent.send("stop")
        stats.update(parent.recv())
        process.join()


def pool_rate(workers: int, latency_s: float, requests: int, fault_fraction: float = 0.0) -> dict:
    with remote_server(latency_s, fault_fraction) as (base_url, server_stats):
        achieved, ideal, ok, elapsed, stats = _drive_pool(base_url, workers, latency_s, requests)
    return {"workers": workers, "latency_s": latency_s, "requests": requests, "ok": ok, "seconds": round(elapsed, 3),
            "achieved_rps": round(achieved, 1), "ideal_rps": round(ideal, 1), "fraction_of_ideal": round(achieved / ideal, 3),
            "retries": stats["retries"], "peak_in_flight": server_stats["peak_in_flight"],
            "billed": server_stats["billed"]}


def _drive_pool(base_url: str, workers: int, latency_s: float, requests: int):
    oracle = OpenAIChatOracle("gpt-4o-mini", TASKS["raw"], max_tokens=8, max_workers=workers,
                              base_url=base_url, retry=RetryPolicy(max_attempts=20, base_delay_s=0.05))
    oracle.score([f"warm {i}" for i in range(workers)])  # open the connections first
    texts = [f"benchmark request {i}" for i in range(requests)]
    started = time.perf_counter()
    results = oracle.score(texts)
    elapsed = time.perf_counter() - started
    stats = oracle.stats()
    oracle.close()
    ok = sum(r.valid for r in results)
    return ok / elapsed, workers / latency_s, ok, elapsed, stats


def epoch_time(prefetch: bool, latency_s: float, epochs: int, model_dir: str, d_model: int, num_layers: int, max_len: int) -> dict:
    import train

    with remote_server(latency_s) as (base_url, _), tempfile.TemporaryDirectory() as out:
        argv = ["--prior-model", model_dir, "--oracle", "openai", "--base-url", base_url, "--batch-size", "16",
                "--max-api-workers", "16", "--d-model", str(d_model), "--num-layers", str(num_layers), "--max-len", str(max_len),
                "--epochs", str(epochs), "--output-dir", out, "--no-progress", "--device", "cpu", "--no-cache",
                "--max-response-tokens", "8", "--save-every", str(epochs + 1),
                "--prefetch" if prefetch else "--no-prefetch"]
        args = train.build_parser().parse_args(argv)
        with contextlib.redirect_stdout(io.StringIO()):
            started = time.perf_counter()
            train.train(args)
            elapsed = time.perf_counter() - started
        with open(os.path.join(out, "metrics_raw.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
    # per-epoch times from the loop's own clock, dropping the first (model warm-up) epoch
    return {"prefetch": prefetch, "epochs": epochs, "total_seconds": round(elapsed, 3),
            "mean_epoch_seconds": round(sum(m["train/epoch_seconds"] for m in metrics[1:]) / (len(metrics) - 1), 4)}


def train_step_time(model_dir: str, d_model: int, num_layers: int, max_len: int, repeats: int = 10) -> float:
    """Sampling plus one TB step with no oracle (prior only): the local part of an epoch."""
    import train

    with tempfile.TemporaryDirectory() as out:
        argv = ["--prior-model", model_dir, "--oracle", "hf", "--llm-weight", "0", "--batch-size", "16",
                "--d-model", str(d_model), "--num-layers", str(num_layers), "--max-len", str(max_len), "--epochs",
                str(repeats + 1), "--output-dir", out, "--no-progress", "--device", "cpu", "--save-every", "1000"]
        with contextlib.redirect_stdout(io.StringIO()):
            train.train(train.build_parser().parse_args(argv))
        with open(os.path.join(out, "metrics_raw.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
    return sum(m["train/epoch_seconds"] for m in metrics[1:]) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds, small settings")
    args = parser.parse_args()
    os.environ["OPENAI_API_KEY"] = "bench-key"
    from conftest import bpe_tokenizer, save_tiny_gpt2

    latency = 0.1
    worker_counts = [4] if args.quick else [8, 32, 128]
    rounds = 2 if args.quick else 20
    result = {"benchmark": "api_pool", "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d"), "pool": [], "pool_10pct_429": [], "epoch": {}}
    for workers in worker_counts:
        result["pool"].append(pool_rate(workers, latency, workers * rounds))
        result["pool_10pct_429"].append(pool_rate(workers, latency, workers * rounds, fault_fraction=0.1))
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
            result["epoch"]["runs"].append({
                "api_latency_s": api_latency, "prefetch_off_epoch_s": off["mean_epoch_seconds"],
                "prefetch_on_epoch_s": on["mean_epoch_seconds"], "sum_of_parts_s": round(local + api_latency, 4),
                "max_of_parts_s": round(max(local, api_latency), 4)})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
