"""The contradiction task: a LoRA policy, conditioned on a prompt built from a subject, asks questions whose answers
by a frozen base LM an NLI model judges to contradict an edit fact (the reward is in contradiction_reward.py).

Each training epoch takes the next example (subject, edit fact) in the dataset, samples a batch of questions
conditioned on `CONTEXT_TEMPLATE` with that subject, scores them, and trains with a log Z of that example's own
(a conditional log Z: one learned scalar per example id). The samples file records every question with its
answer and each reward term.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys

import torch

from batch_pipeline import ScoredBatch, SyncBatches, exploration_settings
from contradiction_reward import (
    Answerer,
    ContradictionReward,
    ContradictionRewardConfig,
    NLIScorer,
    PhaseFormula,
)
from contradiction_reward import contradicts as is_contradiction
from contradiction_reward import on_topic as is_on_topic
from convert_data import load_examples
from durable_files import atomic_write
from errors import UserError
from evaluation import distinct_n, unique_fraction
from hf_models import load_causal_lm
from reward_oracle import OracleResult, PriorScorer, RewardBatch, RewardModel

CONTEXT_TEMPLATE = "Here is a question about {subject}:\n"
CHAT_REQUEST = "Ask one short question about {subject}."
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "contradiction_example.jsonl")


def question_prompt(args: argparse.Namespace, tokenizer) -> str:
    """chat or plain. Runs saved before the flag existed were conditioned on the plain prompt."""
    choice = getattr(args, "question_prompt", "plain")
    if choice == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return choice


def context_ids(tokenizer, subject: str, device: torch.device, prompt: str = "plain") -> torch.Tensor:
    """The tokens the question sampler is conditioned on. An instruct model asked in its chat format writes real
    questions from the start; given the plain prompt, SmolLM2-135M-Instruct mostly wrote fragments."""
    if prompt == "chat":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT_REQUEST.format(subject=subject)}],
            add_generation_prompt=True,
            tokenize=False,
        )
    else:
        text = CONTEXT_TEMPLATE.format(subject=subject)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long, device=device)


def load_dataset(path: str) -> list[dict]:
    """The examples of a data file, read and checked once per process (start-up asks for the conditions and
    the batch source for the examples)."""
    mtime = os.path.getmtime(path) if os.path.exists(path) else None  # a missing file: load_examples says so
    return [dict(example) for example in _read_examples(path, os.path.abspath(path), mtime)]


@functools.lru_cache(maxsize=8)
def _read_examples(path: str, absolute_path: str, mtime: float | None) -> tuple[dict, ...]:
    examples = load_examples(path)
    if not examples:
        raise UserError(f"{path}: no examples")
    return tuple(examples)


def build_task_reward(args: argparse.Namespace, prior_model, tokenizer, device: torch.device):
    """The frozen base model answers (the sampler's own weights with adapters off when --base-model is unset or
    names the same model) and the NLI model judges."""
    if args.base_model in (None, args.prior_model):
        base_model, base_tokenizer = prior_model, tokenizer
    else:
        base_model, base_tokenizer = load_causal_lm(args.base_model, device)
    answerer = Answerer(base_model, base_tokenizer, answer_max_tokens=args.answer_max_tokens)
    nli = NLIScorer.load(args.nli_model, device)
    if getattr(args, "relevance_weight", 0.0) and nli.neutral_index is None:
        raise UserError(f"--nli-model {args.nli_model!r} has no 'neutral' label: set --relevance-weight 0")
    config = ContradictionRewardConfig(
        likelihood_weight=args.likelihood_weight,
        contradiction_threshold=args.contradiction_threshold,
        failure_penalty=args.failure_penalty,
        failure_mode=getattr(args, "failure_mode", "replace"),  # runs saved before the flag replaced
        penalized_steps=args.penalized_steps,
        answer_quality_weight=args.answer_quality_weight,
        answer_quality_threshold=args.answer_quality_threshold,
        answer_failure_penalty=args.answer_failure_penalty,
        relevance_weight=getattr(args, "relevance_weight", 0.0),  # runs saved before these existed had neither
        off_topic_penalty=getattr(args, "off_topic_penalty", 0.0),
        judged_answer=getattr(args, "judged_answer", "answer"),  # runs saved before the flag judged the answer
        judge_against=getattr(args, "judge_against", "edit"),  # and the edit fact, in this order
        nli_order=getattr(args, "nli_order", "fact-answer"),
        question_fluency=getattr(args, "question_fluency", "document"),  # runs saved before the flag
    )
    if config.judge_against == "true-fact":
        missing = [example["id"] for example in load_dataset(args.data) if not example.get("true_fact")]
        if missing:
            raise UserError(
                f"--judge-against true-fact needs every example's true_fact; {args.data} has none for "
                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            )
    # the sampler's question prompt, in the answering model's tokens (log P_Q is that model's)
    prompt = question_prompt(args, tokenizer)
    if config.question_fluency == "prompt" and prompt == "chat" and not getattr(base_tokenizer, "chat_template", None):
        raise UserError(f"--question-fluency prompt: --base-model {args.base_model!r} has no chat template to ask in")

    @functools.lru_cache(maxsize=None)  # one chat template per subject, not one per question scored
    def question_context(subject: str) -> tuple[int, ...]:
        return tuple(context_ids(base_tokenizer, subject, torch.device("cpu"), prompt)[0].tolist())

    return ContradictionReward(answerer, nli, config, question_context)


# the reward's named terms (contradiction_reward.py)
TERMS = ("log_contradiction", "log_related", "subject_question", "log_question", "log_answer")


def score_questions(reward, example: dict, questions: list[str], step: int) -> RewardBatch:
    """The questions' reward terms (log C, log P_Q, log P_A) and log R at this step; the answer is the response y,
    and the formula is the reward's at this step (replayed questions are re-scored with it)."""
    n = len(questions)
    true_facts = [example.get("true_fact")] * n if reward.config.judge_against == "true-fact" else None
    out = reward(questions, [example["edit_fact"]] * n, step, subjects=[example["subject"]] * n, true_facts=true_facts)
    log_reward = out["log_reward"].double()
    results = [
        OracleResult(
            response=r["answer"],
            log_likelihood=r["log_answer"],
            num_tokens=r["answer_tokens"],
            truncated=r["truncated"],
            token_ids=r["token_ids"],
        )
        for r in out["answer_results"]
    ]
    extras = [
        {
            "subject": example["subject"],
            "edit_fact": example["edit_fact"],
            "example_id": example["id"],
            "phase": out["phase"],
        }
        for _ in questions
    ]
    return RewardBatch(
        questions,
        {name: out[name].double() for name in TERMS},
        log_reward,
        torch.isfinite(log_reward),
        results,
        PhaseFormula(reward.config, step),
        extras,
    )


# ----------------------------------------------------------------------------------- the task's plug-in
# build.py calls these four (and reads `uses_oracle_flags`); train.py never names this task.

uses_oracle_flags = False  # the answerer and the NLI judge are local: --oracle / --model do not apply


def conditions(args: argparse.Namespace) -> list[str]:
    """One log Z per example (a conditional log Z)."""
    return [example["id"] for example in load_dataset(args.data)]


def build_reward(
    args: argparse.Namespace, prior_model, tokenizer, device: torch.device, builds_reward: bool
) -> RewardModel:
    """The generic reward is only used to decode and count here: the task's own reward lives in its source."""
    return RewardModel(tokenizer, PriorScorer(prior_model, tokenizer), None)


def make_source(
    args: argparse.Namespace, run, may_spend, save_now, source_state: dict | None, start_epoch: int
) -> "ContradictionBatches":
    reward = build_task_reward(args, run.prior_model, run.tokenizer, run.device)
    start_step = source_state["step"] if source_state else start_epoch  # format-1 checkpoints: one step an epoch
    return ContradictionBatches(
        run.policy,
        run.tokenizer,
        load_dataset(args.data),
        reward,
        start_step,
        question_prompt(args, run.tokenizer),
        **exploration_settings(args, may_spend),
    )


class ContradictionBatches(SyncBatches):
    """Batches of questions, one example per epoch in dataset order (so every subject is visited equally)."""

    def __init__(
        self, policy, tokenizer, examples: list[dict], reward, start_step: int, prompt: str = "plain", **kwargs
    ) -> None:
        super().__init__(policy, None, **kwargs)
        self.tokenizer, self.examples, self.reward, self.prompt = tokenizer, examples, reward, prompt
        self.step = start_step

    def next(self, more: bool = True) -> ScoredBatch | None:
        if not self.may_spend():
            return None
        example = self.examples[self.step % len(self.examples)]
        context = context_ids(self.tokenizer, example["subject"], self.policy.device, self.prompt)
        tokens, lengths, log_q = self.sample(context=context)
        questions = [self.tokenizer.decode(row[:n].tolist()) for row, n in zip(tokens.cpu(), lengths.cpu().tolist())]
        rewards = score_questions(self.reward, example, questions, self.step)  # step 0, 1, ...: the hybrid phase
        self.step += 1
        return ScoredBatch(tokens, lengths, log_q, rewards, condition=example["id"], context=context)

    def checkpoint_state(self) -> dict:
        return {"step": self.step}  # which example comes next and the hybrid reward's phase


# ----------------------------------------------------------------------------------------------- evaluation


ON_TOPIC_NOTE = "on topic = the question names the subject and the judge does not call the answer neutral to the fact"


def evaluate(state: dict, policy, tokenizer, reward, samples_per_subject: int, output: str) -> dict:
    """K questions per example, answered and judged, scored in the composite phase (the hybrid schedule only shapes
    training). Rates: contradiction = P(contradiction) > 0.5; on topic = the question names the subject and
    P(neutral) < 0.5 for (fact, answer); on-topic contradiction = both; question = it has a question mark."""
    run_args = argparse.Namespace(**state["args"])
    examples = load_dataset(run_args.data)
    prompt = question_prompt(run_args, tokenizer)
    rows, records = [], []
    for example in examples:
        context = context_ids(tokenizer, example["subject"], policy.device, prompt)
        tokens, lengths, _ = policy.sample(samples_per_subject, context=context)
        questions = [tokenizer.decode(row[:n].tolist()) for row, n in zip(tokens.cpu(), lengths.cpu().tolist())]
        scored = score_questions(reward, example, questions, step=reward.config.penalized_steps)
        terms = scored.terms
        contradicts = [is_contradiction(float(c)) for c in terms["log_contradiction"]]
        on_topic = [is_on_topic(q, example["subject"], float(r)) for q, r in zip(questions, terms["log_related"])]
        for i, question in enumerate(questions):
            records.append(
                {
                    "question": question,
                    "answer": scored.oracle_results[i].response,
                    "log_reward": float(scored.log_reward[i]),
                    **{name: float(term[i]) for name, term in terms.items()},
                    "contradicts": contradicts[i],
                    "on_topic": on_topic[i],
                    **scored.extras[i],
                }
            )
        rows.append(
            {
                "example_id": example["id"],
                "subject": example["subject"],
                "contradiction_rate": statistics.mean(contradicts),
                "on_topic_rate": statistics.mean(on_topic),
                "on_topic_contradiction_rate": statistics.mean(c and t for c, t in zip(contradicts, on_topic)),
                "question_rate": statistics.mean("?" in q for q in questions),
                "log_question_mean": float(terms["log_question"].mean()),
                "log_answer_mean": float(terms["log_answer"].mean()),
                "unique_fraction": unique_fraction(questions),
                "distinct_2": distinct_n([t[:n].tolist() for t, n in zip(tokens.cpu(), lengths.cpu())], 2),
                "examples": [
                    {"question": q, "answer": r.response, "contradicts": c, "on_topic": t}
                    for q, r, c, t in list(zip(questions, scored.oracle_results, contradicts, on_topic))[:3]
                ],
            }
        )
    keys = ("contradiction_rate", "on_topic_rate", "on_topic_contradiction_rate", "question_rate")
    keys += ("log_question_mean", "log_answer_mean", "unique_fraction", "distinct_2")
    overall = {key: statistics.mean(r[key] for r in rows) for key in keys}
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(output, lambda f: f.write(lines.encode()))
    summary = {
        "checkpoint_epoch": state["epoch"],
        "samples_per_subject": samples_per_subject,
        "question_prompt": prompt,
        "on_topic": ON_TOPIC_NOTE,
        "overall": overall,
        "per_example": rows,
        "output": output,
    }
    atomic_write(
        os.path.splitext(output)[0] + "_summary.json",
        lambda f: f.write(json.dumps(summary, indent=2, ensure_ascii=False).encode()),
    )
    return summary


def format_table(summary: dict) -> str:
    """Per example: the rates and means; then, per subject, a few questions with their answers."""
    header = (
        f"{'example':<18} {'contra':>6} {'on-topic':>8} {'on-topic contra':>15} {'question':>8} {'log P_Q':>8} "
        f"{'log P_A':>8} {'unique':>6} {'dist-2':>6}"
    )
    lines = [header, "-" * len(header)]

    def line(name: str, r: dict) -> str:
        return (
            f"{name[:18]:<18} {r['contradiction_rate']:>6.2f} {r['on_topic_rate']:>8.2f} "
            f"{r['on_topic_contradiction_rate']:>15.2f} {r['question_rate']:>8.2f} {r['log_question_mean']:>8.1f} "
            f"{r['log_answer_mean']:>8.1f} {r['unique_fraction']:>6.2f} {r['distinct_2']:>6.2f}"
        )

    lines += [line(r["example_id"], r) for r in summary["per_example"]]
    lines += [line("overall", summary["overall"]), f"({summary.get('on_topic', ON_TOPIC_NOTE)})", ""]
    by_subject: dict[str, list[dict]] = {}
    for r in summary["per_example"]:
        by_subject.setdefault(r["subject"], []).extend(r["examples"])
    for subject, shown in by_subject.items():
        lines.append(f"{subject}:")
        for e in shown[:3]:
            flags = ("contradicts" if e["contradicts"] else "agrees/neutral") + (", on topic" if e["on_topic"] else "")
            lines.append(f"  Q: {e['question'][:90]!r}\n     A: {e['answer'][:90]!r}  [{flags}]")
    return "\n".join(lines)


def evaluate_checkpoint(
    args: argparse.Namespace,
    state: dict,
    run_args: argparse.Namespace,
    prior_model,
    tokenizer,
    policy,
    device: torch.device,
) -> dict:
    """sample.py's entry for this task: K questions per example, judged, with the table printed to stderr."""
    reward = build_task_reward(run_args, prior_model, tokenizer, device)
    output = args.output or os.path.splitext(args.checkpoint)[0] + "_questions.jsonl"
    summary = evaluate(state, policy, tokenizer, reward, args.samples_per_subject, output)
    print(format_table(summary), file=sys.stderr)
    return summary
