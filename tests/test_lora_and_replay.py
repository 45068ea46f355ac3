# --replay-novelty and --replay-stale-prefix: their counts go through the checkpoint (memory) or stay in Redis;
# the tiny random policy's texts do not repeat, so whether restored counts move the ranking is tested in
# test_replay_buffer.py
"""The LoRA policy on the prior LM, replay and exploration mixing in training, reward schedules and guards."""

import argparse
import contextlib
import io
import json
import math
import os

import pytest
import torch
from cli_helpers import read_jsonl, run_main, tiny_flags

import train
from build import build_policy, load_prior
from checkpoint import load_checkpoint
from gflownet_policy import LoRAPolicy
from hf_models import load_causal_lm
from reward_oracle import PriorScorer


def lora_args(model_dir: str, tmp_path, *extra: str) -> argparse.Namespace:
    return train.build_parser().parse_args(
        [
            "--prior-model",
            model_dir,
            "--oracle",
            "hf",
            "--policy",
            "lora",
            "--max-len",
            "6",
            "--batch-size",
            "4",
            "--max-response-tokens",
            "4",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
            "--device",
            "cpu",
            "--seed",
            "5",
            "--lora-r",
            "4",
            *extra,
        ]
    )


def build(args):
    prior_model, tokenizer = load_prior(args, torch.device("cpu"))
    policy = build_policy(args, prior_model, tokenizer, torch.device("cpu"))
    return prior_model, tokenizer, policy


def test_lora_policy_starts_as_the_prior_lm_and_its_cache_matches_teacher_forcing(tiny_lm_dir, tmp_path):
    args = lora_args(tiny_lm_dir, tmp_path, "--prior-include-eos", "--max-len", "12", "--lora-stop", "eos")
    prior_model, tokenizer, policy = build(args)
    assert isinstance(policy, LoRAPolicy) and policy.stop_mode == "eos"
    assert policy.stop_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "flow_head" in name for name in trainable)
    torch.manual_seed(0)
    tokens, lengths, sampler_log_prob = policy.sample(32)
    assert torch.allclose(sampler_log_prob, policy.log_pf(tokens, lengths), atol=1e-4)
    # LoRA's B matrices start at zero: P_F(x, stop) is exactly the LM's p(x) p(<|endoftext|> | x) for any x
    # shorter than max_len (at max_len the stop is forced, not the LM's choice).
    generator = torch.Generator().manual_seed(1)
    assert tokenizer.all_special_ids == [policy.stop_token_id] == [0]
    tokens = torch.randint(1, policy.config.vocab_size, (16, 12), generator=generator)  # any non-special token
    lengths = torch.randint(1, 12, (16,), generator=generator)
    tokens[torch.arange(12).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    prior = PriorScorer(prior_model, tokenizer, include_eos=True).log_prob(tokens, lengths)
    # The one difference: x may not be empty (min_len 1), so the first step renormalises over tokens.
    with torch.no_grad():
        first = torch.log_softmax(prior_model(input_ids=torch.tensor([[policy.start_id]])).logits[0, -1].double(), -1)
    renormalisation = -torch.log1p(-first[policy.stop_token_id].exp()).item()
    assert renormalisation > 1e-4
    assert torch.allclose(policy.log_pf(tokens, lengths).detach().double(), prior.double() + renormalisation, atol=1e-4)


def test_lora_stop_head_starts_as_the_lm_with_uniform_lengths(tiny_lm_dir, tmp_path):
    min_len, max_len = 2, 7
    args = lora_args(tiny_lm_dir, tmp_path, "--min-len", str(min_len), "--max-len", str(max_len))
    prior_model, tokenizer, policy = build(args)
    assert policy.stop_mode == "head"
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert "stop_bias" in trainable and "stop_head.weight" in trainable
    # Untrained: log P_F(x) = sum_t log p_LM(x_t | x_<t, not a special token) - log(number of lengths), exactly.
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, policy.config.vocab_size, (12, max_len), generator=generator)
    lengths = torch.randint(min_len, max_len + 1, (12,), generator=generator)
    tokens[torch.arange(max_len).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    special = torch.tensor(tokenizer.all_special_ids)
    expected = []
    with torch.no_grad():
        for row, n in zip(tokens, lengths.tolist()):
            logits = (
                prior_model(input_ids=torch.cat([torch.tensor([policy.start_id]), row[:n]]).unsqueeze(0))
                .logits[0]
                .double()
            )
            logits[:, special] = float("-inf")
            log_probs = torch.log_softmax(logits, -1)
            expected.append(sum(log_probs[t, row[t]].item() for t in range(n)) - math.log(max_len - min_len + 1))
    got = policy.log_pf(tokens, lengths).detach().double()
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    # sampling follows it: lengths spread over the whole range (with "eos" this tiny LM almost never stops)
    torch.manual_seed(0)
    tokens, lengths, sampler_log_prob = policy.sample(400)
    assert torch.allclose(sampler_log_prob, policy.log_pf(tokens, lengths), atol=1e-4)
    counts = torch.bincount(lengths, minlength=max_len + 1)[min_len:]
    assert counts.min() > 400 / 6 * 0.6 and counts.max() < 400 / 6 * 1.4, counts


def test_prior_is_scored_with_adapters_off_after_training(tiny_lm_dir, tmp_path):
    model, tokenizer = load_causal_lm(tiny_lm_dir, reload=True)
    tokens = torch.tensor([[5, 9, 17, 3], [40, 41, 0, 0]])
    lengths = torch.tensor([4, 2])
    before = PriorScorer(model, tokenizer).log_prob(tokens, lengths)
    with contextlib.redirect_stdout(io.StringIO()):
        result = train.train(lora_args(tiny_lm_dir, tmp_path, "--epochs", "3", "--lr", "0.05"))
    policy = result["policy"]
    lora_weights = [p for name, p in policy.named_parameters() if "lora_B" in name]
    assert any(p.abs().sum() > 0 for p in lora_weights)  # the adapters moved...
    after = result["reward_model"].prior.log_prob(tokens, lengths)
    assert torch.allclose(before, after, atol=1e-5)  # ...but the prior is still the pretrained LM
    assert not torch.allclose(policy.log_pf(tokens, lengths).detach(), before, atol=1e-3)


def test_lora_run_resumes_with_the_same_losses(tiny_lm_dir, tmp_path):
    def run(output_dir, *extra):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert (
                train.main(
                    [
                        *tiny_flags(tiny_lm_dir, output_dir, "--policy", "lora", "--seed", "5"),
                        "--lora-r",
                        "4",
                        "--lr",
                        "0.01",
                        "--loss",
                        "subtb",
                        "--save-every",
                        "2",
                        *extra,
                    ]
                )
                == 0
            )
        with open(os.path.join(output_dir, "metrics_raw.jsonl")) as f:
            return {m["epoch"]: m["train/loss"] for m in map(json.loads, f)}

    straight = run(tmp_path / "a", "--epochs", "4")
    run(tmp_path / "b", "--epochs", "2")
    resumed = run(tmp_path / "b", "--epochs", "4", "--resume")
    assert resumed == pytest.approx(straight, rel=1e-5, abs=1e-6)
    state = load_checkpoint(str(tmp_path / "a" / "checkpoint_gfn_raw_epoch4.pt"))
    assert state["policy_record"]["lora"]["r"] == 4 and set(state["policy"]) == {"lora", "flow_head", "stop"}
    assert state["policy_record"]["lora"]["stop"] == "head"
    # only adapter weights are saved, not the base model
    assert sum(t.numel() for t in state["policy"]["lora"].values()) < 20_000


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_training_mixes_replayed_samples(tiny_lm_dir, tmp_path, backend, request):
    extra = ["--replay-fraction", "0.5", "--replay-backend", backend, "--tempered-fraction", "0.5"]
    if backend == "redis":
        extra += ["--redis-url", request.getfixturevalue("redis_url")]
    args = train.build_parser().parse_args(tiny_flags(tiny_lm_dir, tmp_path, "--epochs", "4", *extra))
    with contextlib.redirect_stdout(io.StringIO()):
        train.train(args)
    with open(tmp_path / "metrics_raw.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert metrics[0]["train/num_replayed"] == 0  # nothing stored before the first batch
    assert all(m["train/num_replayed"] == 4 for m in metrics[1:])  # half of each training batch of 8
    samples = [json.loads(line) for line in open(tmp_path / "samples_raw.jsonl")]
    assert len(samples) == 16  # replayed samples cost no oracle call and are not written again
    if backend == "redis":  # the run's items live under a namespace made from its run id
        from replay_buffer import make_replay_buffer

        state = load_checkpoint(str(tmp_path / "checkpoint_gfn_raw_epoch4.pt"))
        namespace = state["replay"]["namespace"]
        assert namespace == f"gfn-replay-raw-{state['run_id'][:16]}"
        buffer = make_replay_buffer("redis", 1000, redis_url=request.getfixturevalue("redis_url"), namespace=namespace)
        assert 1 <= len(buffer) <= 16
        buffer.clear()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_interrupted_run_with_replay_resumes_with_the_same_losses(tiny_lm_dir, tmp_path, backend, request):
    # --replay-novelty and --replay-stale-prefix: their counts go through the checkpoint (memory) or stay in Redis;
    # the tiny random policy's texts do not repeat, so whether restored counts move the ranking is tested in
    # test_replay_buffer.py
    extra = ["--replay-fraction", "0.5", "--replay-backend", backend, "--replay-priority", "rank"]
    extra += ["--replay-novelty", "2", "--replay-stale-prefix", "2"]
    if backend == "redis":
        extra += ["--redis-url", request.getfixturevalue("redis_url")]

    def run(output_dir, *more):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert (
                train.main(tiny_flags(tiny_lm_dir, output_dir, "--seed", "11", "--save-every", "3", *extra, *more)) == 0
            )
        with open(os.path.join(output_dir, "metrics_raw.jsonl")) as f:
            return {m["epoch"]: (m["train/loss"], m["train/num_replayed"]) for m in map(json.loads, f)}

    straight = run(tmp_path / "a", "--epochs", "7")
    run(tmp_path / "b", "--epochs", "3")
    resumed = run(tmp_path / "b", "--epochs", "7", "--resume")
    assert all(replayed == 4 for epoch, (_, replayed) in straight.items() if epoch > 1)  # replay is really used
    # the resumed directory's metrics: epochs 1-3 from the first part, 4-7 from the resumed one
    assert {e: n for e, (_, n) in resumed.items()} == {e: n for e, (_, n) in straight.items()}
    assert {e: loss for e, (loss, _) in resumed.items()} == pytest.approx(
        {e: loss for e, (loss, _) in straight.items()}, rel=1e-5, abs=1e-6
    )


def test_reward_temperature_anneals_linearly():
    args = argparse.Namespace(reward_temp_start=4.0, reward_temp_end=1.0, reward_temp_horizon=3)
    assert [train.reward_temperature(args, epoch) for epoch in (1, 2, 3, 4, 10)] == [4.0, 3.0, 2.0, 1.0, 1.0]
    args.reward_temp_horizon = 0
    assert train.reward_temperature(args, 7) == 4.0


def test_modified_subtb_with_a_sampled_oracle_is_a_one_line_error(tiny_lm_dir, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = train.main(
            [
                "--prior-model",
                tiny_lm_dir,
                "--oracle",
                "hf",
                "--loss",
                "modified-subtb",
                "--output-dir",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
    assert code == 2 and "modified-subtb scores every prefix" in err.getvalue() and err.getvalue().count("\n") == 1


def test_lora_on_unknown_modules_is_a_one_line_error(tiny_lm_dir, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = train.main(
            [
                "--prior-model",
                tiny_lm_dir,
                "--oracle",
                "hf",
                "--policy",
                "lora",
                "--lora-target-modules",
                "no_such_layer",
                "--output-dir",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
    last_line = err.getvalue().strip().splitlines()[-1]  # earlier lines: transformers' own loading progress bar
    assert code == 2 and last_line.startswith("error: cannot add LoRA adapters") and "no_such_layer" in last_line


def test_non_finite_rewards_are_reported_with_the_sample_and_never_trained_on(tiny_lm_dir, tmp_path):
    from reward_oracle import OracleResult

    class HalfBrokenOracle:  # every other x gets log p(y|x) = -inf, as an overflowing scorer would
        def score(self, texts):
            return [OracleResult("y", float("-inf") if i % 2 else -3.0, 1) for i in range(len(texts))]

    def install(policy, reward_model):
        reward_model.oracle = HalfBrokenOracle()

    args = train.build_parser().parse_args(
        [
            "--prior-model",
            tiny_lm_dir,
            "--oracle",
            "hf",
            "--max-len",
            "6",
            "--batch-size",
            "4",
            "--d-model",
            "32",
            "--num-layers",
            "1",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
            "--device",
            "cpu",
            "--epochs",
            "2",
        ]
    )
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        result = train.train(args, on_start=install)
    assert "2 sample(s) skipped: non-finite reward (log_prior=" in err.getvalue() and "first: '" in err.getvalue()
    with open(tmp_path / "metrics_raw.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["train/num_invalid"] for m in metrics] == [2, 2]
    assert all(torch.isfinite(p).all() for p in result["policy"].parameters())
    assert torch.isfinite(result["log_z"]()).all()
    samples = [json.loads(line) for line in open(tmp_path / "samples_raw.jsonl")]
    assert [s["valid"] for s in samples] == [True, False] * 4 and samples[1]["log_reward"] is None


def test_local_search_recompletes_replayed_x_within_the_same_calls(tiny_lm_dir, tmp_path):
    """--local-search-fraction 0.5: once the buffer holds samples, the last half of each batch re-completes x
    drawn from it after dropping their last --local-search-back tokens. Same batch size, so the same calls."""
    flags = ["--replay-fraction", "0.5", "--local-search-fraction", "0.5", "--local-search-back", "2"]
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path, "--epochs", "5", "--seed", "4", *flags))
    assert code == 0, err
    samples = read_jsonl(tmp_path / "samples_raw.jsonl")
    metrics = read_jsonl(tmp_path / "metrics_raw.jsonl")
    assert len(samples) == 20 and metrics[-1]["train/oracle_calls"] == 20
    for epoch in range(2, 6):
        batch = [s for s in samples if s["epoch"] == epoch]
        earlier = [s["token_ids"] for s in samples if s["epoch"] < epoch and s["valid"]]
        for row in batch[2:]:  # each shares all but the last 2 tokens of some earlier x
            assert any(row["token_ids"][: max(0, len(x) - 2)] == x[: max(0, len(x) - 2)] for x in earlier)
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path / "bad", "--local-search-fraction", "0.5"))
    assert code == 2 and "set --replay-fraction > 0" in err


class LetterPolicy:
    """A stand-in policy for SyncBatches: each call hands out the next x of a fixed script (one character a
    token), so which rows are drawn again, and what replaces them, is known exactly."""

    def __init__(self, script: list[str]) -> None:
        self.script, self.calls = list(script), []
        self.device = torch.device("cpu")

    def sample(self, size: int, temperature: float = 1.0, epsilon: float = 0.0, context=None):
        texts = [self.script.pop(0) for _ in range(size)]
        self.calls.append(texts)
        tokens = torch.zeros(size, 4, dtype=torch.long)
        for i, text in enumerate(texts):
            tokens[i, : len(text)] = torch.tensor([ord(c) for c in text])
        return tokens, torch.tensor([len(t) for t in texts]), torch.arange(size, dtype=torch.float)


class LetterDecoder:
    @staticmethod
    def decode(tokens: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return ["".join(chr(c) for c in row[:n].tolist()) for row, n in zip(tokens, lengths.tolist())]


def letter_batches(script: list[str], tries: int, scored: list[str] | None = None):
    from batch_pipeline import SyncBatches

    return SyncBatches(
        LetterPolicy(script), LetterDecoder(), 4, 1.0, 0.0, lambda: True, fresh_x_tries=tries, scored_texts=scored
    )


def test_fresh_x_tries_draws_again_rows_already_paid_for_or_repeated_in_the_batch():
    # "ab" was paid for before; "A b!" normalises to "a b" (not "ab"); "c" repeats within the batch
    source = letter_batches(["ab", "c", "C.", "a b", "ab", "d", "e"], tries=3, scored=["ab"])
    tokens, lengths, log_q = source.sample()
    assert source.policy.calls == [["ab", "c", "C.", "a b"], ["ab", "d"], ["e"]]
    # row 0 ("ab") was drawn again as "ab" (still a repeat), then "e"; row 2 ("C." = "c") became "d"
    assert LetterDecoder.decode(tokens, lengths) == ["e", "c", "d", "a b"]
    assert log_q.tolist() == [0.0, 1.0, 1.0, 3.0]  # each row keeps the log q of the draw that replaced it
    assert source.redrawn == 3
    assert source.scored_texts == {"ab", "e", "c", "d", "a b"}
    assert source.checkpoint_state() == {"scored_texts": ["a b", "ab", "c", "d", "e"]}


def test_fresh_x_tries_keeps_a_repeat_after_its_tries_and_is_off_by_default():
    source = letter_batches(["x", "x", "y", "z", "x", "x"], tries=2)
    tokens, lengths, _ = source.sample()
    assert LetterDecoder.decode(tokens, lengths) == ["x", "x", "y", "z"]  # second "x" redrawn twice as "x"
    assert source.redrawn == 2
    off = letter_batches(["x", "x", "y", "z"], tries=0)
    tokens, lengths, _ = off.sample()
    assert LetterDecoder.decode(tokens, lengths) == ["x", "x", "y", "z"]
    assert off.redrawn == 0 and off.checkpoint_state() is None and not off.scored_texts


def test_fresh_x_tries_in_training_pays_for_fewer_repeats_and_resumes_with_them(tiny_lm_dir, tmp_path):
    """One-token x from the tiny LM repeat often; with --fresh-x-tries the policy's and local search's rows are
    drawn again until new (the oracle's counter is unchanged: nothing is paid twice), and a resumed run remembers
    what was paid for before the restart."""
    from resurrect import normalised_text

    common = ["--max-len", "1", "--replay-fraction", "0.5", "--local-search-fraction", "0.5"]
    common += ["--local-search-back", "1", "--save-every", "3"]

    def repeats(output_dir, *extra) -> tuple[int, list[str], dict]:
        code, err = run_main(tiny_flags(tiny_lm_dir, output_dir, "--epochs", "6", *common, *extra))
        assert code == 0, err
        samples = read_jsonl(output_dir / "samples_raw.jsonl")
        texts = [normalised_text(s["x"]) for s in samples]
        return len(texts) - len(set(texts)), texts, read_jsonl(output_dir / "metrics_raw.jsonl")[-1]

    plain, _, plain_metrics = repeats(tmp_path / "plain")
    fresh, texts, metrics = repeats(tmp_path / "fresh", "--fresh-x-tries", "8")
    assert plain >= 4 and fresh < plain  # the script has repeats to remove, and removes them
    assert metrics["train/fresh_x_redrawn"] > 0 and "train/fresh_x_redrawn" not in plain_metrics
    assert metrics["train/oracle_calls"] == plain_metrics["train/oracle_calls"] == 24
    # stopped at epoch 3 and resumed: the same 24 x, so the remembered texts came back from the checkpoint
    run_main(tiny_flags(tiny_lm_dir, tmp_path / "resumed", "--epochs", "3", *common, "--fresh-x-tries", "8"))
    state = load_checkpoint(str(tmp_path / "resumed" / "checkpoint_gfn_raw_epoch3.pt"))
    assert set(state["source_state"]["scored_texts"]) == set(texts[:12])
    _, resumed, _ = repeats(tmp_path / "resumed", "--fresh-x-tries", "8", "--resume")
    assert resumed == texts


def test_fresh_x_tries_flag_errors(tiny_lm_dir, tmp_path):
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path, "--fresh-x-tries", "-1"))
    assert code == 2 and "--fresh-x-tries must be >= 0" in err
    batch_api = ["--oracle", "openai", "--oracle-model", "gpt-4o-mini", "--batch-api"]
    code, err = run_main(tiny_flags(tiny_lm_dir, tmp_path, "--fresh-x-tries", "2", *batch_api))
    assert code == 2 and "--fresh-x-tries works with the plain tasks'" in err


def test_prefetched_batches_keep_the_paid_texts_beside_the_batch_sent_ahead():
    from batch_pipeline import PrefetchBatches

    restored = {"scored_texts": ["q", "r"]}
    source = PrefetchBatches(LetterPolicy(["q", "s"]), LetterDecoder(), 2, 1.0, 0.0, lambda: True, fresh_x_tries=1)
    assert source.checkpoint_state() == {"scored_texts": []}
    source = PrefetchBatches(
        LetterPolicy(["q", "s", "t"]),
        LetterDecoder(),
        2,
        1.0,
        0.0,
        lambda: True,
        fresh_x_tries=1,
        pending_state=restored,
    )
    tokens, lengths, _ = source.sample()
    assert LetterDecoder.decode(tokens, lengths) == ["t", "s"]  # "q" was paid for before the restart
    assert source.checkpoint_state() == {"scored_texts": ["q", "r", "s", "t"]}
    source.executor.shutdown()
