"""The contradiction task's ceiling (issue 21): does the answerer know the facts it is asked to contradict?

For every example of a data file, the answerer is asked the fact directly (the hand-written questions in
benchmarks/data/contradiction_ceiling_questions.json, two phrasings each), greedily, as the task's reward asks
it. Each answer is judged two ways:
- states the true fact: it contains a content word that the true fact has and the edit fact lacks, and none that
  the edit fact has and the true fact lacks (lower case, punctuation dropped; "Stratford-upon-Avon" against
  "Canterbury"): a lexical check, read by hand on every row of the results file;
- an on-topic contradiction of the edit, by the task's own judge and definitions (`ContradictionReward` with the
  command line's defaults, then `contradicts` and `on_topic` of contradiction_reward.py): what a trained sampler
  is rewarded for. A question that a model answers with the true fact is the ideal question; the fraction of such
  answers is the most the sampler can reach by asking the fact.
The task's judge is measured under every setting: 4 forms of the answer (JUDGED_ANSWERS) x 2 NLI orders, judging
against the edit (P(contradiction) > 0.5) and against the true fact (`.../entails-true-fact`: P(entailment) > 0.5,
--judge-against true-fact); for each, the fraction of true-fact answers it accepts and of the others.

  python benchmarks/contradiction_ceiling.py --answerer out/smollm2 --nli-model ../shared/models/nli-minilm-snli-v2 \
      --output benchmarks/results/contradiction_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QUESTIONS = os.path.join(ROOT, "benchmarks", "data", "contradiction_ceiling_questions.json")


# function words: "of" in "The School of Athens" does not make an answer state that edit
FUNCTION_WORDS = frozenset(
    "the a an of in on at to for by with from and or is was were are be been it its as that this".split()
)


def distinguishing_words(true_fact: str, edit_fact: str) -> tuple[set[str], set[str]]:
    """(content words only the true fact has, content words only the edit fact has), normalised as resurrect.py's
    dedup does."""
    from resurrect import normalised_words

    true_words = set(normalised_words(true_fact)) - FUNCTION_WORDS
    edit_words = set(normalised_words(edit_fact)) - FUNCTION_WORDS
    return true_words - edit_words, edit_words - true_words


def states_true_fact(answer: str, true_fact: str, edit_fact: str) -> bool:
    from resurrect import normalised_words

    only_true, only_edit = distinguishing_words(true_fact, edit_fact)
    words = set(normalised_words(answer))
    return bool(words & only_true) and not words & only_edit


JUDGED = ("states_true_fact", "contradiction", "on_topic_contradiction")
RATES = {"states_true_fact": "true_fact_rate", "contradiction": "contradiction_rate",
         "on_topic_contradiction": "on_topic_contradiction_rate"}  # fmt: skip


def answer_rows(examples: list[dict], questions: dict[str, list[str]], answer) -> list[dict]:
    """One row per asked question: its example, the answerer's answer (`answer(questions) -> texts`) and whether
    it states the true fact."""
    rows = []
    for example in examples:
        asked = questions.get(example["id"], [])
        for question, text in zip(asked, answer(asked) if asked else []):
            rows.append({
                "id": example["id"], "subject": example["subject"], "question": question, "answer": text,
                "edit_fact": example["edit_fact"],
                "states_true_fact": states_true_fact(text, example["true_fact"], example["edit_fact"]),
            })  # fmt: skip
    return rows


def ceiling(rows: list[dict], judge) -> dict:
    """Per subject and overall: the fraction of answers stating the true fact and the fraction that are (on-topic)
    contradictions of the edit by `judge(questions, answers, edit_facts) -> (log P(contradiction), log P(related))`,
    with every row; and how the judge treats answers that state the true fact (each one contradicts the edit) and
    the others."""
    from contradiction_reward import contradicts, on_topic

    log_c, log_related = judge(
        [r["question"] for r in rows], [r["answer"] for r in rows], [r["edit_fact"] for r in rows]
    )
    judged_rows = []
    for i, row in enumerate(rows):
        judged_rows.append({
            **{k: v for k, v in row.items() if k != "edit_fact"},
            "contradiction": contradicts(float(log_c[i])),
            "on_topic_contradiction": contradicts(float(log_c[i])) and on_topic(row["question"], row["subject"],
                                                                                float(log_related[i])),
        })  # fmt: skip
    per_subject: dict[str, dict] = {}
    for row in judged_rows:
        entry = per_subject.setdefault(row["subject"], {"answers": 0, **{judged: 0 for judged in JUDGED}})
        entry["answers"] += 1
        for judged in JUDGED:
            entry[judged] += row[judged]
    for entry in per_subject.values():
        for judged in JUDGED:
            entry[RATES[judged]] = round(entry[judged] / entry["answers"], 3)
    total = len(judged_rows) or 1
    true_rows = [r for r in judged_rows if r["states_true_fact"]]
    other_rows = [r for r in judged_rows if not r["states_true_fact"]]
    return {
        "answers": len(judged_rows),
        **{RATES[judged]: round(sum(r[judged] for r in judged_rows) / total, 3) for judged in JUDGED},
        # a judge that works accepts the first and rejects the second
        "true_fact_answers_accepted": round(
            sum(r["on_topic_contradiction"] for r in true_rows) / max(len(true_rows), 1), 3
        ),
        "other_answers_accepted": round(
            sum(r["on_topic_contradiction"] for r in other_rows) / max(len(other_rows), 1), 3
        ),
        "subjects_with_ceiling_at_least_half": sorted(
            s for s, e in per_subject.items() if e["on_topic_contradiction_rate"] >= 0.5
        ),
        "per_subject": per_subject,
        "rows": judged_rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answerer", required=True, help="the task's base LM (hub id or folder)")
    parser.add_argument("--nli-model", required=True)
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "contradiction_example.jsonl"))
    parser.add_argument("--questions", default=QUESTIONS)
    parser.add_argument("--answer-max-tokens", type=int, default=32, help="the task's --answer-max-tokens")
    parser.add_argument("--output", default=None, help="JSON file (default: print)")
    parser.add_argument(
        "--training-judge",
        default="first-sentence/answer-fact/entails-true-fact",
        help="the judge setting the training runs use (a key of the output's `judges`): its per-subject ceiling and "
        "rows are written as `training_judge`",
    )
    args = parser.parse_args(argv)

    from contradiction_reward import (
        JUDGED_ANSWERS,
        NLI_ORDERS,
        Answerer,
        ContradictionReward,
        ContradictionRewardConfig,
        NLIScorer,
    )
    from hf_models import load_causal_lm

    with open(args.data, encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()]
    with open(args.questions, encoding="utf-8") as f:
        questions = json.load(f)
    model, tokenizer = load_causal_lm(args.answerer)
    answerer = Answerer(model, tokenizer, answer_max_tokens=args.answer_max_tokens)
    nli = NLIScorer.load(args.nli_model)
    started = time.time()
    rows = answer_rows(examples, questions, lambda asked: [r["answer"] for r in answerer.answer(asked)])
    answered_s = time.time() - started
    # every setting of the task's own judge (ContradictionReward.judge): against the edit (contradiction), and the
    # other way round, against the true fact (entailment: what a small NLI model may see where "contradicts the
    # edit" is beyond it), each reading the answer in every form and both NLI orders
    true_of = {example["edit_fact"]: example["true_fact"] for example in examples}
    against = ["edit"] + (["true-fact"] if nli.entailment_index is not None else [])
    judges = {}
    for judge_against in against:
        for judged_answer in JUDGED_ANSWERS:
            for order in NLI_ORDERS:
                config = ContradictionRewardConfig(
                    judged_answer=judged_answer, nli_order=order, judge_against=judge_against
                )
                reward = ContradictionReward(answerer, nli, config)

                def judge(asked, answers, facts, reward=reward):
                    if reward.config.judge_against == "true-fact":
                        facts = [true_of[f] for f in facts]
                    log_probs = reward.judge(asked, answers, facts)
                    return log_probs[:, reward.accept_index], nli.log_related(log_probs)

                suffix = "/entails-true-fact" if judge_against == "true-fact" else ""
                judges[f"{judged_answer}/{order}{suffix}"] = ceiling(rows, judge)
    # the task's judge as configured by default, then the one that best separates true-fact answers from others
    default = judges["answer/fact-answer"]
    best = max(judges, key=lambda k: judges[k]["true_fact_answers_accepted"] - judges[k]["other_answers_accepted"])
    summary = {"benchmark": "contradiction_ceiling", "date": time.strftime("%Y-%m-%d"), "answerer": args.answerer,
               "nli_model": args.nli_model, "answer_max_tokens": args.answer_max_tokens,
               "answer_seconds": round(answered_s, 1), "seconds": round(time.time() - started, 1),
               "best_judge": best, **default, "best": {k: v for k, v in judges[best].items() if k != "rows"},
               "judges": {k: {m: v for m, v in j.items() if m not in ("rows", "per_subject")}
                          for k, j in judges.items()}}  # fmt: skip
    summary["best"]["rows"] = judges[best]["rows"]
    if args.training_judge in judges:
        summary["training_judge"] = {"setting": args.training_judge, **judges[args.training_judge]}
    text = json.dumps(summary, indent=1) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    compact = {k: v for k, v in summary.items() if k not in ("rows", "per_subject", "best")}
    print(json.dumps(compact, indent=1))


if __name__ == "__main__":
    main()
