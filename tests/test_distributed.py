"""torchrun data parallelism on the CPU (gloo): 2 processes against 1, on the same data."""

import contextlib
import io
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp

import train
from checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(model_dir: str, output_dir: str, batch_size: int, *extra: str) -> list[str]:
    return [
        "--prior-model",
        model_dir,
        "--oracle",
        "hf",
        "--policy",
        "lora",
        "--lora-r",
        "4",
        "--max-len",
        "6",
        "--batch-size",
        str(batch_size),
        "--max-response-tokens",
        "4",
        "--output-dir",
        output_dir,
        "--no-progress",
        "--device",
        "cpu",
        "--seed",
        "11",
        "--lr",
        "0.01",
        "--epochs",
        "3",
        "--save-every",
        "3",
        *extra,
    ]


def _worker(rank: int, world_size: int, port: int, argv: list[str], results) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = train.train(train.build_parser().parse_args(argv))
    state = result["policy"].trainable_state()
    # Plain lists, not tensors: a tensor sent through a torch Queue is shared by file descriptor, which is gone
    # once this process exits, possibly before the parent reads it.
    results.put((rank, {k: v.double().tolist() for k, v in state["lora"].items()}, result["log_z"]().item()))


def run_two_ranks(argv: list[str]) -> dict:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_worker, args=(rank, 2, port, argv, results)) for rank in range(2)]
    for p in processes:
        p.start()
    out = {
        rank: ({k: torch.tensor(v, dtype=torch.float64) for k, v in lora.items()}, log_z)
        for rank, lora, log_z in (results.get(timeout=240) for _ in processes)
    }
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def test_two_ranks_stay_identical_and_match_one_process_on_the_same_data(tiny_lm_dir, tmp_path):
    # --reward-rank0: rank 0 samples and scores 2 x 4 questions and broadcasts them; each rank trains on 4.
    ranks = run_two_ranks(flags(tiny_lm_dir, str(tmp_path / "ddp"), 4, "--reward-rank0"))
    (lora0, log_z0), (lora1, log_z1) = ranks[0], ranks[1]
    assert lora0.keys() == lora1.keys() and lora0
    for name in lora0:
        assert torch.equal(lora0[name], lora1[name]), name  # bit-identical across ranks
    assert log_z0 == log_z1
    # One process, batch 8, same seed: the same 8 samples, the same mean gradient.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        single = train.train(train.build_parser().parse_args(flags(tiny_lm_dir, str(tmp_path / "one"), 8)))
    single_lora = single["policy"].trainable_state()["lora"]
    moved = False
    for name in lora0:
        assert torch.allclose(lora0[name], single_lora[name].double(), atol=1e-5), name
        moved |= bool(single_lora[name].abs().sum() > 0) and "lora_B" in name
    assert moved  # the comparison is not between two untouched initialisations
    assert abs(log_z0 - single["log_z"]().item()) < 1e-4
    # only rank 0 wrote: one checkpoint, and every sample of the 2 x 4 batches once
    assert os.listdir(tmp_path / "ddp").count("checkpoint_gfn_raw_epoch3.pt") == 1
    with open(tmp_path / "ddp" / "samples_raw.jsonl") as f:
        assert len(f.readlines()) == 3 * 8


def test_torchrun_cli_symmetric_mode_writes_once_and_resumes(tiny_lm_dir, tmp_path):
    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            os.path.join(ROOT, "train.py"),
            *flags(tiny_lm_dir, str(tmp_path), 4, *extra),
        ]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )

    first = torchrun("--epochs", "2", "--save-every", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    state = load_checkpoint(str(tmp_path / "checkpoint_gfn_raw_epoch2.pt"))
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])  # ranks explore apart
    resumed = torchrun("--epochs", "4", "--save-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from epoch 2" in resumed.stderr
    with open(tmp_path / "samples_raw.jsonl") as f:
        samples = f.readlines()
    assert len(samples) == 4 * 2 * 4  # 4 epochs x 2 ranks x batch 4, each written once by rank 0
