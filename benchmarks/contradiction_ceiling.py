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


def ceiling(examples: list[dict], questions: dict[str, list[str]], reward) -> dict:
    """Per example and per subject: the fraction of answers stating the true fact and the fraction that are on-topic
    contradictions of the edit, with every question and answer."""
    from contradiction_reward import contradicts, on_topic

    rows = []
    for example in examples:
        asked = questions.get(example["id"], [])
        if not asked:
            continue
        out = reward(asked, [example["edit_fact"]] * len(asked), step=10**9, subjects=[example["subject"]] * len(asked))
        for i, question in enumerate(asked):
            answer = out["answers"][i]
            rows.append({
                "id": example["id"], "subject": example["subject"], "question": question, "answer": answer,
                "states_true_fact": states_true_fact(answer, example["true_fact"], example["edit_fact"]),
                "contradiction": contradicts(float(out["log_contradiction"][i])),
                "on_topic_contradiction": contradicts(float(out["log_contradiction"][i]))
                and on_topic(question, example["subject"], float(out["log_related"][i])),
            })  # fmt: skip
    per_subject: dict[str, dict] = {}
    for row in rows:
        entry = per_subject.setdefault(row["subject"], {"answers": 0, **{judged: 0 for judged in JUDGED}})
        entry["answers"] += 1
        for judged in JUDGED:
            entry[judged] += row[judged]
    for entry in per_subject.values():
        for judged in JUDGED:
            entry[RATES[judged]] = round(entry[judged] / entry["answers"], 3)
    total = len(rows) or 1
    return {
        "answers": len(rows),
        **{RATES[judged]: round(sum(r[judged] for r in rows) / total, 3) for judged in JUDGED},
        "subjects_with_ceiling_at_least_half": sorted(
            s for s, e in per_subject.items() if e["on_topic_contradiction_rate"] >= 0.5
        ),
        "per_subject": per_subject,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answerer", required=True, help="the task's base LM (hub id or folder)")
    parser.add_argument("--nli-model", required=True)
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "contradiction_example.jsonl"))
    parser.add_argument("--questions", default=QUESTIONS)
    parser.add_argument("--output", default=None, help="JSON file (default: print)")
    args = parser.parse_args(argv)

    from contradiction_reward import Answerer, ContradictionReward, ContradictionRewardConfig, NLIScorer
    from hf_models import load_causal_lm

    with open(args.data, encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()]
    with open(args.questions, encoding="utf-8") as f:
        questions = json.load(f)
    model, tokenizer = load_causal_lm(args.answerer)
    reward = ContradictionReward(
        Answerer(model, tokenizer), NLIScorer.load(args.nli_model), ContradictionRewardConfig()
    )
    started = time.time()
    result = ceiling(examples, questions, reward)
    summary = {"benchmark": "contradiction_ceiling", "date": time.strftime("%Y-%m-%d"), "answerer": args.answerer,
               "nli_model": args.nli_model, "seconds": round(time.time() - started, 1), **result}  # fmt: skip
    text = json.dumps(summary, indent=1) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    compact = {k: v for k, v in summary.items() if k not in ("rows", "per_subject")}
    print(json.dumps(compact, indent=1))


if __name__ == "__main__":
    main()
