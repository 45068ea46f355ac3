"""Throughput: sampling with the KV cache against recomputing the whole prefix every step, training steps per
second, and prior scoring against a bare batched forward pass of the same model (the ratio is our overhead; the
bare pass is the limit). GPT-2 vocabulary size (50,257), randomly initialised models, batch 16. Prints JSON.

`--bookkeeping` instead runs the real training loop (train.train) on a tiny local setup and reports how much of
each epoch goes to the per-step bookkeeping (building the samples file's records, writing them durably, the
step's metrics and their logging) against the whole epoch. It finds the functions by name in this checkout, so
the same script measures an older commit too (run it from a worktree of that commit: before/after).

  python benchmarks/throughput.py                 # the run in BENCHMARKS.md (CPU here; the same script on CUDA)
  python benchmarks/throughput.py --quick         # seconds
  python benchmarks/throughput.py --bookkeeping   # the loop's own overhead per epoch
  python benchmarks/throughput.py --bookkeeping --train-flags "--replay-fraction 0.9 --updates-per-batch 4"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from gflownet_policy import LogZ, PolicyConfig, TransformerPolicy  # noqa: E402
from trajectory_balance import trajectory_balance_loss  # noqa: E402


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


@torch.no_grad()
def sample_without_cache(policy: TransformerPolicy, batch_size: int) -> torch.Tensor:
    """The naive sampler: a full forward pass over the whole prefix for every new token."""
    device, max_len = policy.device, policy.config.max_len
    inputs = torch.full((batch_size, 1), policy.start_id, dtype=torch.long, device=device)
    for t in range(max_len):
        logits, _, _ = policy._forward(inputs, 0, None)
        probs = policy.masked_log_probs(logits[:, -1], policy._action_mask(t, batch_size)).exp()
        probs[:, policy.stop_id] = 0  # fixed length, so both samplers generate the same number of tokens
        inputs = torch.cat([inputs, torch.multinomial(probs, 1)], dim=1)
    return inputs


def policy_numbers(max_len: int, batch_size: int, d_model: int, num_layers: int, repeats: int, device) -> dict:
    torch.manual_seed(0)
    config = PolicyConfig(
        vocab_size=50257, max_len=max_len, min_len=max_len, d_model=d_model, num_layers=num_layers, num_heads=4
    )
    policy = TransformerPolicy(config).to(device)
    tokens_per_batch = batch_size * max_len  # min_len = max_len: every sequence has exactly max_len tokens
    cached = timed(lambda: policy.sample(batch_size), repeats, device)
    uncached = timed(lambda: sample_without_cache(policy, batch_size), repeats, device)
    log_z = LogZ().to(device)
    optimizer = torch.optim.Adam(list(policy.parameters()) + list(log_z.parameters()), lr=1e-4)
    tokens, lengths, _ = policy.sample(batch_size)
    log_reward = torch.randn(batch_size, device=device)

    def step():
        loss = trajectory_balance_loss(log_z(), policy.log_pf(tokens, lengths), log_reward)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_seconds = timed(step, repeats, device)
    return {
        "max_len": max_len,
        "batch_size": batch_size,
        "d_model": d_model,
        "num_layers": num_layers,
        "sample_tokens_per_s_kv_cache": round(tokens_per_batch / cached, 1),
        "sample_tokens_per_s_recompute": round(tokens_per_batch / uncached, 1),
        "kv_cache_speedup": round(uncached / cached, 2),
        "train_steps_per_s": round(1 / train_seconds, 2),
    }


def prior_numbers(max_len: int, batch_size: int, n_embd: int, n_layer: int, repeats: int, device) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from reward_oracle import PriorScorer

    class Tokenizer:  # what PriorScorer needs: where texts start and end (GPT-2's <|endoftext|>)
        eos_token_id = bos_token_id = 50256

        def get_vocab(self):
            return {"<|endoftext|>": 50256}

    torch.manual_seed(0)
    model = (
        GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=max_len + 1)).to(device).eval()
    )
    scorer = PriorScorer(model, Tokenizer(), batch_size=batch_size)
    tokens = torch.randint(0, 50256, (batch_size, max_len), device=device)
    lengths = torch.full((batch_size,), max_len, device=device)
    inputs = torch.cat([torch.full((batch_size, 1), 50256, device=device), tokens], dim=1)
    with torch.no_grad():
        bare = timed(lambda: model(input_ids=inputs).logits, repeats, device)
    scored = timed(lambda: scorer.log_prob(tokens, lengths), repeats, device)
    return {
        "max_len": max_len,
        "batch_size": batch_size,
        "n_embd": n_embd,
        "n_layer": n_layer,
        "prior_tokens_per_s": round(batch_size * max_len / scored, 1),
        "bare_forward_tokens_per_s": round(batch_size * max_len / bare, 1),
        "overhead_ratio": round(scored / bare, 3),
    }


class Stopwatch:
    """Adds up the time spent inside wrapped functions, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attribute: str, name: str, only=None) -> None:
        original = getattr(owner, attribute)

        def timed_call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if only is None or only(*args, **kwargs):
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

        setattr(owner, attribute, timed_call)


def bookkeeping_numbers(
    epochs: int,
    batch_size: int,
    max_len: int,
    prior: str | None = None,
    oracle: str | None = None,
    policy: str = "",
    train_flags: str = "",
) -> dict:
    """Per-epoch wall time of train.train and the part of it spent on bookkeeping (see the module docstring):
    a tiny random GPT-2 (BPE vocabulary of the test fixtures) is the prior and the local oracle, the policy a
    64-wide 1-layer transformer, so the model work is small and the loop's own overhead shows. With `prior` /
    `oracle` / `policy` (e.g. SmolLM2 and a LoRA policy) it measures a real setup instead. Also splits the epoch
    into the oracle's time (y generated and scored, and x it writes) and the tool's own (sampling x, prior,
    training, the rest)."""
    import contextlib
    import importlib
    import io
    import tempfile

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import durable_files
    import train
    from conftest import bpe_tokenizer, save_tiny_gpt2

    records = importlib.import_module("run_log") if os.path.exists(os.path.join(ROOT, "run_log.py")) else train
    outputs = importlib.import_module("run_log") if hasattr(records, "Outputs") else importlib.import_module("build")
    watch = Stopwatch()
    watch.wrap(records, "sample_records", "sample_records")
    watch.wrap(records, "step_metrics", "step_metrics")
    watch.wrap(outputs.Outputs, "log", "metrics_logging")
    watch.wrap(durable_files.JsonlAppender, "write", "samples_write", only=lambda self, _: "samples_" in self.path)
    import reward_oracle

    oracle_watch = Stopwatch()
    oracle_watch.wrap(reward_oracle.RewardModel, "query_oracle", "oracle")
    for name in ("propose_x", "propose_answered"):  # x the oracle writes (and answers, in one generation) is its work
        if hasattr(reward_oracle.RewardModel, name):
            oracle_watch.wrap(reward_oracle.RewardModel, name, "oracle")
    if records is not train:  # train.py calls the names it imported
        for name in ("sample_records", "step_metrics"):
            setattr(train, name, getattr(records, name))
    with tempfile.TemporaryDirectory() as folder:
        model = prior or save_tiny_gpt2(os.path.join(folder, "lm"), bpe_tokenizer(), seed=0, n_embd=32)
        argv = ["--prior-model", model, "--oracle", "hf", "--d-model", "64", "--num-layers", "1"]
        argv += ["--oracle-model", oracle or model] + (["--policy", policy] if policy else [])
        argv += ["--oracle-format", "plain", "--llm-temperature", "0"] if oracle else []
        argv += ["--max-len", str(max_len), "--batch-size", str(batch_size)]
        argv += ["--max-response-tokens", "16" if oracle else "4"]
        argv += ["--epochs", str(epochs), "--save-every", str(epochs), "--output-dir", os.path.join(folder, "run")]
        argv += ["--device", "cpu", "--seed", "0", *shlex.split(train_flags)]
        args = train.build_parser().parse_args(argv)
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            train.train(args)
        total = time.perf_counter() - started
        with open(os.path.join(folder, "run", f"metrics_{args.task}.jsonl")) as f:
            epoch_seconds = [json.loads(line)["train/epoch_seconds"] for line in f]
    steady = epoch_seconds[1:]  # the first epoch pays for warm-up
    per_epoch = {name: round(seconds / epochs * 1000, 3) for name, seconds in sorted(watch.seconds.items())}
    bookkeeping_ms = sum(watch.seconds.values()) / epochs * 1000
    epoch_ms = sum(steady) / len(steady) * 1000
    oracle_ms = oracle_watch.seconds.get("oracle", 0.0) / epochs * 1000
    return {
        "prior": prior or "tiny random GPT-2",
        "train_flags": train_flags,
        "oracle_ms_per_epoch": round(oracle_ms, 2),
        "tool_ms_per_epoch": round(sum(epoch_seconds) / epochs * 1000 - oracle_ms, 2),
        "epochs": epochs,
        "batch_size": args.batch_size,  # the train flags may set both
        "max_len": args.max_len,
        "run_seconds": round(total, 2),
        "epoch_ms": round(epoch_ms, 2),
        "bookkeeping_ms_per_epoch": per_epoch,
        "bookkeeping_ms": round(bookkeeping_ms, 2),
        "bookkeeping_share": round(bookkeeping_ms / epoch_ms, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bookkeeping", action="store_true", help="the training loop's own overhead per epoch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prior-model", help="--bookkeeping: a real prior instead of the tiny one")
    parser.add_argument("--oracle-model", help="--bookkeeping: a real local oracle (plain text, greedy y)")
    parser.add_argument("--policy", default="", help="--bookkeeping: e.g. lora")
    parser.add_argument("--epochs", type=int, default=None, help="--bookkeeping: epochs to run")
    parser.add_argument("--train-flags", default="", help="--bookkeeping: more train.py flags, one string")
    args = parser.parse_args()
    if args.bookkeeping:
        epochs = args.epochs or (10 if args.quick else 200)
        result = {
            "benchmark": "bookkeeping",
            "date": time.strftime("%Y-%m-%d"),
            "commit": os.popen(f"git -C {ROOT} rev-parse --short HEAD").read().strip(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
            **bookkeeping_numbers(epochs, 16, 8, args.prior_model, args.oracle_model, args.policy, args.train_flags),
        }
        print(json.dumps(result, indent=2))
        return
    device = torch.device(args.device)
    repeats = 1 if args.quick else 3
    lengths = [8] if args.quick else [32, 128]
    size = dict(d_model=64, num_layers=1) if args.quick else dict(d_model=256, num_layers=4)
    prior_size = dict(n_embd=64, n_layer=1) if args.quick else dict(n_embd=768, n_layer=12)
    result = {
        "benchmark": "throughput",
        "device": str(device),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"Python {platform.python_version()}",
        "policy": [policy_numbers(n, 16, repeats=repeats, device=device, **size) for n in lengths],
        "prior": [prior_numbers(n, 16, repeats=repeats, device=device, **prior_size) for n in lengths],
    }
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
