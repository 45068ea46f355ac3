"""The reward for contradictory question generation: questions q whose answers contradict an edit fact.

A policy writes questions q about a subject. A frozen base LM answers each one greedily (the answer a), and an
NLI classifier judges whether a contradicts the edit fact f (e.g. "The play Hamlet was written by Christopher
Marlowe."): questions that make the unedited model contradict f are the ones a knowledge edit has to change.
Every term is returned separately, for logging:

    log C   = log P_NLI(contradiction | premise = f, hypothesis = a)     (order configurable, see below)
              or, judging against the true fact t that the edit replaced (judge_against="true-fact"),
              log P_NLI(entailment | a, t): an answer that states the true fact contradicts the edit
    log Rel = log (1 - P_NLI(neutral | f, a))   the answer is about the fact at all (entails or contradicts it)
    S(q)    = 1 if q is a question (has a "?") that names the subject (one of its naming words), else 0
    log P_Q = log P_base(q)        teacher-forced after the document-start token: fluency, keeps q natural
              (question_fluency="prompt": log P_base(q | the sampler's question prompt for its subject), so that
              the fluency a failing question keeps under failure_mode="add" is that of the untrained sampler's own
              questions about the subject, not of any text: the target is then the untrained sampler tilted
              toward passing questions, and the policy starts at it)
    log P_A = log P_base(a | q)    the greedy answer under the untempered model, with its end token if it ended
    A(q)    = w_A * log P_A  (+ answer_failure_penalty where log P_A < answer_quality_threshold, when set)
    T(q)    = w_R * log Rel + (1 - S(q)) * off_topic_penalty               the relevance terms

    composite phase (step >= penalized_steps):  log R = log C + w_L * log P_Q + A(q) + T(q)
    penalised phase (step <  penalized_steps):  log R = w_L * log P_Q + A(q) + T(q)
                                                      where log C >= contradiction_threshold and S(q) = 1
                                                      (the S(q) condition only with an off_topic_penalty)
                                                log R = failure_penalty + A(q) + T(q) elsewhere
                                                (failure_mode="add": failure_penalty + w_L * log P_Q + A(q)
                                                + T(q) elsewhere: the penalty tilts the base model's questions)

Why relevance: an NLI judge can call an unrelated answer a contradiction ("The sky is blue." against "Hamlet was
written by Christopher Marlowe.": 0.82 from the v1 MiniLM judge), and a policy then learns to ask off-topic
questions. Two guards that fail differently: a lexical one on the question (S: it must be a question naming the
subject), and a judged one on the answer (log Rel: NLI judges trained with unrelated pairs as "neutral" say so).

The penalised ("hybrid") phase first teaches the policy *which* questions contradict at all, ranking those
only by fluency; the composite phase then ranks them by how surely they contradict. The answer-quality terms
apply in both phases.

Failures are a large *finite* negative log-reward, never -inf: the GFlowNet target R(q) / Z must stay a
distribution, and the trajectory-balance loss (log Z + log P_F - log R)^2 would be infinite, and its gradient
NaN, for a single -inf in the batch. Every term is a sum of log-softmaxes of finite logits, so it is finite
too; `valid` marks the rows where that nevertheless failed (a NaN from the model), like RewardBatch.valid.

Premise / hypothesis order: by default premise = the edit fact, hypothesis = the base model's answer. The
question asked is "does the answer contradict the fact we want the model to hold?", and NLI models are
trained with the reference statement as the premise and the claim being checked as the hypothesis. The
contradiction label is nearly symmetric in principle but not in trained models, so `nli_order="answer-fact"`
is available to swap the pair.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from errors import UserError
from hf_models import continuation_log_likelihoods, document_start_id, end_token_ids, generate_with_logprobs
from reward_oracle import PriorScorer

NLI_ORDERS = ("fact-answer", "answer-fact")
# what the judge reads as the answer: all of it, its first sentence, or either after the question (a short answer
# like "Christopher Marlowe." says nothing on its own; a 135M model's rambling after its first sentence is often
# about something else)
JUDGED_ANSWERS = ("answer", "first-sentence", "question-answer", "question-first-sentence")
# what the judge compares the answer with: the edit fact (log C = log P(contradiction)), or the true fact the edit
# replaced (log C = log P(entailment): an answer that states the true fact contradicts the edit). The second is the
# one the MiniLM judges can see (benchmarks/contradiction_ceiling.py: with the answer's first sentence as premise
# it accepts 50% of the answers that state the true fact and 7.5% of the others; against the edit no setting
# separates them). It needs every example's true_fact.
JUDGED_AGAINST = ("edit", "true-fact")
FAILURE_MODES = ("replace", "add")  # how the penalised phase's failure penalty enters log R (see the config)
QUESTION_FLUENCY = ("document", "prompt")  # what log P_Q is conditioned on (see the module docstring)


def first_sentence(text: str) -> str:
    """Up to and including the first ".", "!" or "?" that ends a sentence (followed by white space or the end),
    or the first line when there is none."""
    match = re.search(r"[.!?](?=\s|$)", text)
    return (text[: match.end()] if match else text.split("\n")[0]).strip()


def judged_text(question: str, answer: str, judged_answer: str) -> str:
    """The text the NLI judge reads for one answer (see JUDGED_ANSWERS)."""
    if judged_answer.endswith("first-sentence"):
        answer = first_sentence(answer)
    return f"{question.strip()} {answer}" if judged_answer.startswith("question") else answer


# ----------------------------------------------------------------------------------------------------- NLI


class NLIScorer:
    """Any AutoModelForSequenceClassification NLI model; the contradiction label is found from config.id2label
    (case-insensitive match of 'contradiction'; a clear ValueError naming the labels if absent)."""

    def __init__(self, model, tokenizer, batch_size: int = 32, max_length: int = 256) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        id2label = {int(i): str(label) for i, label in model.config.id2label.items()}
        matches = [i for i, label in id2label.items() if label.strip().lower() == "contradiction"]
        if len(matches) != 1:
            raise ValueError(
                f"NLI model needs exactly one 'contradiction' label in config.id2label; "
                f"its labels are {sorted(id2label.items())}"
            )
        self.contradiction_index = matches[0]
        neutral = [i for i, label in id2label.items() if label.strip().lower() == "neutral"]
        self.neutral_index = neutral[0] if len(neutral) == 1 else None  # two-label judges have no neutral
        entailment = [i for i, label in id2label.items() if label.strip().lower() == "entailment"]
        self.entailment_index = entailment[0] if len(entailment) == 1 else None  # --judge-against true-fact

    @classmethod
    def load(cls, spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "NLIScorer":
        """Tokenizer and classifier from a hub id or folder. float32 by default: checkpoints are often fp16 (the
        MiniLM one is), and fp16 on CPU is slow, while the model is small enough that memory does not matter."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForSequenceClassification.from_pretrained(spec, dtype=dtype)
            model.to(device).eval()
            model.requires_grad_(False)
            return cls(model, tokenizer)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot load NLI model {spec!r}: {first_line}") from None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def log_contradiction(self, premises: list[str], hypotheses: list[str]) -> torch.Tensor:
        """(B,) float64 log P(contradiction | premise, hypothesis) = log_softmax(logits)[contradiction]."""
        return self.log_probs(premises, hypotheses)[:, self.contradiction_index]

    def log_related(self, log_probs: torch.Tensor) -> torch.Tensor:
        """(B,) log (1 - P(neutral)) from `log_probs` rows: the pair is judged related (entailed or contradicted)."""
        if self.neutral_index is None:
            raise UserError("the NLI model has no 'neutral' label: set --relevance-weight 0")
        others = [i for i in range(log_probs.shape[1]) if i != self.neutral_index]
        return torch.logsumexp(log_probs[:, others], dim=1)

    @torch.no_grad()
    def log_probs(self, premises: list[str], hypotheses: list[str]) -> torch.Tensor:
        """(B, labels) float64 log-probabilities of every label."""
        if len(premises) != len(hypotheses):
            raise ValueError(f"{len(premises)} premises but {len(hypotheses)} hypotheses")
        out = []
        for start in range(0, len(premises), self.batch_size):
            batch = self.tokenizer(
                premises[start : start + self.batch_size],
                hypotheses[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            logits = self.model(**batch.to(self.device)).logits
            # float64 before the softmax: a confident "no" stays a finite, exact log-prob instead of rounding
            out.append(torch.log_softmax(logits.double(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.model.config.id2label), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ answerer


class Answerer:
    """The frozen base LM: answers each question greedily and scores log P_Q(q) and log P_A(a | q).

    Instruct models (the tokenizer has a chat template) get the question as the user turn; base models get
    `prompt_template` after the document-start token. For plain prompts the answer also ends after the first
    token containing `plain_stop` (a newline by default): the Q/A format holds one answer per line, and
    without a stop a base model goes on to invent the next question, which the NLI model would then judge.
    That stop token counts as the answer's end token, like EOS. `plain_stop=None` turns it off.

    When the base model is the policy's own LoRA-wrapped model, every pass runs with the adapters off."""

    def __init__(
        self,
        model,
        tokenizer,
        answer_max_tokens: int = 32,
        prompt_template: str = "Q: {question}\nA:",
        batch_size: int = 16,
        plain_stop: str | None = "\n",
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.answer_max_tokens = answer_max_tokens
        self.prompt_template = prompt_template
        self.batch_size = batch_size
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.stop = None if self.use_chat_template else plain_stop
        self.start_id = document_start_id(tokenizer)
        self.eos_ids = end_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.prior = PriorScorer(model, tokenizer, include_eos=False, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_ids(self, question: str) -> list[int]:
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        text = self.prompt_template.format(question=question)
        return [self.start_id] + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer(self, questions: list[str]) -> list[dict]:
        """Each {"answer", "log_answer", "answer_tokens", "truncated", "token_ids"}: the greedy answer (text
        cut at the stop string and stripped), log P_A(answer | question) in float64 over its answer_tokens
        token ids, and truncated=True when it hit answer_max_tokens without an end token."""
        results = []
        for start in range(0, len(questions), self.batch_size):
            results.extend(self._answer_batch([self.prompt_ids(q) for q in questions[start : start + self.batch_size]]))
        return results

    def _answer_batch(self, prompts: list[list[int]]) -> list[dict]:
        generated, token_lp = generate_with_logprobs(
            self.model, prompts, self.answer_max_tokens, self.eos_ids, self.pad_id
        )  # greedy
        results = []
        for i, ids in enumerate(generated):
            end = self._end_position(ids)
            num = len(ids) if end is None else end + 1  # the end token belongs to the answer
            text = self.tokenizer.decode(ids[:num], skip_special_tokens=True)
            if self.stop:
                text = text.split(self.stop)[0]
            results.append(
                {
                    "answer": text.strip(),
                    "log_answer": float(token_lp[i, :num].sum()),
                    "answer_tokens": num,
                    "truncated": end is None,
                    "token_ids": ids[:num],
                }
            )
        return results

    def _end_position(self, ids: list[int]) -> int | None:
        """Index of the answer's last token: the first end token, or the first token that completes the stop
        string. Rows that finished early are padded, and the pad id is often the EOS id, hence 'first'."""
        for j, token in enumerate(ids):
            if token in self.eos_ids:
                return j
            if self.stop and self.stop in self.tokenizer.decode(ids[: j + 1], skip_special_tokens=True):
                return j
        return None

    def log_question(self, questions: list[str], contexts: list[list[int]] | None = None) -> torch.Tensor:
        """(B,) float64 log P_Q(q) of each question's tokens after the document-start token (no end token:
        questions are snippets whose length the policy's stop action decides), via the prior's scorer; with
        `contexts`, after the document-start token and each question's context tokens (its question prompt)."""
        rows = [self.tokenizer(q, add_special_tokens=False)["input_ids"] for q in questions]
        if contexts is not None:
            scores = continuation_log_likelihoods(self.model, self.start_id, contexts, rows, self.batch_size)
            return torch.tensor(scores, dtype=torch.float64)
        if not rows:
            return torch.zeros(0, dtype=torch.float64)
        lengths = torch.tensor([len(r) for r in rows])
        tokens = torch.full((len(rows), max(1, int(lengths.max()))), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return self.prior.log_prob(tokens, lengths).double()


# -------------------------------------------------------------------------------------------------- reward


@dataclass
class ContradictionRewardConfig:
    likelihood_weight: float = 1.0  # w_L on log P_Q
    contradiction_threshold: float = -6.0  # penalised phase: log C must be >= this
    # Penalised phase: log R of a question whose answer does not contradict. Large but finite (not -inf), so that
    # R stays a distribution; it must sit well below w_L * log P_Q of passing questions (GPT-2 gives ~3-4 nats
    # a token, so -60 to -100 for a 20-30 token question), or a short failure outranks a long success.
    failure_penalty: float = -100.0
    penalized_steps: int = 150  # penalised phase length, in training steps
    # Penalised phase: "replace": a failing question's log R is failure_penalty + A + T, without its fluency term, so
    # among failures (nearly every question at first) rambling text costs nothing and the sampler drifts to it
    # (README "Relevance sweep": question rate 0.30 -> 0.02). "add": failure_penalty is added to the full log R of a
    # pass, w_L log P_Q + A + T: the target is the base model's own questions tilted by exp(-failure_penalty)
    # toward passing ones, so a failure carries at most exp(failure_penalty) / P(pass) of the mass, and the
    # sampler keeps the base model's fluency while it learns what passes.
    failure_mode: str = "replace"
    # the defaults of the command line, picked by the relevance sweep (README)
    answer_quality_weight: float = 0.5  # w_A on log P_A (0 = off)
    answer_quality_threshold: float | None = -25.0  # if set: log P_A below it adds answer_failure_penalty
    answer_failure_penalty: float = -20.0
    nli_order: str = "fact-answer"  # "fact-answer": premise = edit fact, hypothesis = answer; or "answer-fact"
    relevance_weight: float = 1.0  # w_R on log Rel = log(1 - P_NLI(neutral | fact, answer)); 0 = off
    off_topic_penalty: float = -20.0  # added when the question does not name the subject; 0 = off
    judged_answer: str = "answer"  # what the judge reads as the answer: one of JUDGED_ANSWERS
    judge_against: str = "edit"  # what the judge compares it with: one of JUDGED_AGAINST
    question_fluency: str = "document"  # log P_Q after the document start, or after the question prompt ("prompt")

    def __post_init__(self) -> None:
        if self.nli_order not in NLI_ORDERS:
            raise ValueError(f"nli_order must be one of {NLI_ORDERS}, not {self.nli_order!r}")
        if self.judged_answer not in JUDGED_ANSWERS:
            raise ValueError(f"judged_answer must be one of {JUDGED_ANSWERS}, not {self.judged_answer!r}")
        if self.judge_against not in JUDGED_AGAINST:
            raise ValueError(f"judge_against must be one of {JUDGED_AGAINST}, not {self.judge_against!r}")
        for name in (
            "failure_penalty",
            "answer_failure_penalty",
            "contradiction_threshold",
            "likelihood_weight",
            "answer_quality_weight",
            "relevance_weight",
            "off_topic_penalty",
        ):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, not {getattr(self, name)}")
        if self.question_fluency not in QUESTION_FLUENCY:
            raise ValueError(f"question_fluency must be one of {QUESTION_FLUENCY}, not {self.question_fluency!r}")
        if self.failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure_mode must be one of {FAILURE_MODES}, not {self.failure_mode!r}")
        if self.penalized_steps < 0:
            raise ValueError(f"penalized_steps must be >= 0, not {self.penalized_steps}")


class ContradictionReward:
    """log R(q) for a batch of questions, each with its own edit fact; see the module docstring."""

    def __init__(
        self,
        answerer: Answerer,
        nli: NLIScorer,
        config: ContradictionRewardConfig,
        question_context: Callable[[str], Sequence[int]] | None = None,
    ) -> None:
        """`question_context(subject)`: the token ids the sampler is conditioned on for that subject, which
        question_fluency="prompt" scores each question after."""
        self.answerer, self.nli, self.config = answerer, nli, config
        if config.question_fluency == "prompt" and question_context is None:
            raise ValueError("question_fluency='prompt' needs the sampler's question_context")
        self.question_context = question_context
        if config.judge_against == "true-fact" and nli.entailment_index is None:
            raise UserError("judging against the true fact needs an NLI model with an 'entailment' label")
        # the label whose log-probability is log C
        self.accept_index = nli.contradiction_index if config.judge_against == "edit" else nli.entailment_index

    def phase(self, step: int) -> str:
        return "penalized" if step < self.config.penalized_steps else "composite"

    def judge(self, questions: list[str], answers: list[str], facts: list[str]) -> torch.Tensor:
        """(B, labels) float64 NLI log-probabilities of each answer (as `judged_answer` says) against its fact (the
        edit fact or the true fact, as `judge_against` says), in `nli_order`."""
        judged = [judged_text(q, a, self.config.judged_answer) for q, a in zip(questions, answers)]
        facts = list(facts)
        return self.nli.log_probs(*((facts, judged) if self.config.nli_order == "fact-answer" else (judged, facts)))

    def __call__(
        self,
        questions: list[str],
        edit_facts: list[str],
        step: int,
        subjects: list[str] | None = None,
        true_facts: list[str] | None = None,
    ) -> dict:
        """Returns (B,) float64 tensors "log_reward", "log_contradiction", "log_related", "subject_question" (0/1),
        "log_question", "log_answer", "answer_penalty" (0 or answer_failure_penalty), bool tensors
        "passes_threshold" (the penalised phase's gate, `passes_threshold`) and "valid" (log R finite),
        the list "answers" (text), "answer_results" (the Answerer's dicts), and "phase": "penalized" or
        "composite". Without `subjects`, every question counts as naming its subject. `true_facts`: what the
        judge compares the answers with under judge_against="true-fact"."""
        if len(questions) != len(edit_facts):
            raise ValueError(f"{len(questions)} questions but {len(edit_facts)} edit facts")
        against_true = self.config.judge_against == "true-fact"
        if against_true and (true_facts is None or len(true_facts) != len(questions) or not all(true_facts)):
            raise ValueError("judge_against='true-fact' needs a true fact for every question")
        cfg = self.config
        answer_results = self.answerer.answer(questions)
        answers = [r["answer"] for r in answer_results]
        contexts = None
        if cfg.question_fluency == "prompt":
            if subjects is None:
                raise ValueError("question_fluency='prompt' needs each question's subject")
            contexts = [list(self.question_context(subject)) for subject in subjects]
        log_question = self.answerer.log_question(questions, contexts)
        log_answer = torch.tensor([r["log_answer"] for r in answer_results], dtype=torch.float64)
        log_probs = self.judge(questions, answers, true_facts if against_true else edit_facts)
        log_contradiction = log_probs[:, self.accept_index]
        # the relatedness of the same pair (both orders alike), recorded whenever the judge has a neutral label;
        # required of it only when weighted
        has_neutral = self.nli.neutral_index is not None
        log_related = (
            self.nli.log_related(log_probs) if has_neutral or cfg.relevance_weight else torch.zeros_like(log_answer)
        )
        subject_question = torch.tensor(
            [1.0 if subjects is None else float(asks_about(q, s)) for q, s in zip(questions, subjects or questions)],
            dtype=torch.float64,
        )

        terms = {
            "log_contradiction": log_contradiction,
            "log_related": log_related,
            "subject_question": subject_question,
            "log_question": log_question,
            "log_answer": log_answer,
        }
        log_reward = PhaseFormula(self.config, step)(terms)
        return {
            "log_reward": log_reward,
            **terms,
            "answer_penalty": answer_penalty(self.config, log_answer),
            "passes_threshold": passes_threshold(cfg, terms),
            "valid": torch.isfinite(log_reward),
            "answers": answers,
            "answer_results": answer_results,
            "phase": self.phase(step),
        }


# Words that do not identify a subject on their own ("the", "of", "mount" in "Mount Everest" do identify it with
# the rest, but a question naming only them is not about it).
_NOT_NAMES = frozenset("the a an of and in on at to for by with from mount saint st de da van von la le".split())


def subject_words(subject: str) -> set[str]:
    """The words of a subject that name it: lower case, at least 3 letters, not a function word."""
    return {w for w in re.findall(r"[^\W_]+", subject.lower()) if len(w) >= 3 and w not in _NOT_NAMES}


def names_subject(question: str, subject: str) -> bool:
    """The question contains one of the subject's naming words as a whole word (case-insensitive): "Who built the
    Eiffel Tower?" names "Eiffel Tower"; "Who built it?" and "Eiffelish" do not."""
    words = set(re.findall(r"[^\W_]+", question.lower()))
    return bool(subject_words(subject) & words)


def asks_about(question: str, subject: str) -> bool:
    """S(q): a question (it has a question mark) that names the subject."""
    return "?" in question and names_subject(question, subject)


def relevance_term(config: ContradictionRewardConfig, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """T(q) = w_R * log Rel + (1 - S(q)) * off_topic_penalty. Terms stored before these existed count as on topic."""
    log_related = terms.get("log_related")
    subject_question = terms.get("subject_question")
    total = torch.zeros_like(terms["log_question"])
    if log_related is not None:
        total = total + config.relevance_weight * log_related
    if subject_question is not None:
        total = total + (1 - subject_question) * config.off_topic_penalty
    return total


def answer_penalty(config: ContradictionRewardConfig, log_answer: torch.Tensor) -> torch.Tensor:
    """answer_failure_penalty where log P_A < answer_quality_threshold (when set), else 0."""
    penalty = torch.zeros_like(log_answer)
    if config.answer_quality_threshold is not None:
        penalty[log_answer < config.answer_quality_threshold] = config.answer_failure_penalty
    return penalty


@dataclass(frozen=True)
class PhaseFormula:
    """The formula of the module docstring at one training step (which sets the phase), from the named terms:
    a small picklable value (it travels with a batch under torchrun). Replayed questions are re-scored with the
    current step's formula, so a question stored in the penalised phase is ranked by the composite formula once
    that phase begins."""

    config: ContradictionRewardConfig
    step: int

    def __call__(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        log_contradiction, log_question, log_answer = (
            terms["log_contradiction"],
            terms["log_question"],
            terms["log_answer"],
        )
        answer_term = cfg.answer_quality_weight * log_answer + answer_penalty(cfg, log_answer)
        answer_term = answer_term + relevance_term(cfg, terms)
        if self.step >= cfg.penalized_steps:  # the composite phase
            return log_contradiction + cfg.likelihood_weight * log_question + answer_term
        failure = torch.full_like(log_question, cfg.failure_penalty)
        if cfg.failure_mode == "add":
            failure = failure + cfg.likelihood_weight * log_question
        return torch.where(passes_threshold(cfg, terms), cfg.likelihood_weight * log_question, failure) + answer_term


def passes_threshold(config: ContradictionRewardConfig, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The penalised phase's gate: log C >= the threshold and, while there is an off-topic penalty, the question
    is a question ("?") that names the subject (subject_question; stored terms without it pass)."""
    passes = terms["log_contradiction"] >= config.contradiction_threshold
    if "subject_question" in terms and config.off_topic_penalty != 0:
        passes = passes & (terms["subject_question"] > 0.5)
    return passes


def contradicts(log_contradiction: float) -> bool:
    """What evaluation and sweep.py call a contradicting answer: the judge's P(contradiction) > 0.5."""
    return log_contradiction > math.log(0.5)


def on_topic(question: str, subject: str, log_related: float) -> bool:
    """What evaluation and sweep.py call on topic: the question names the subject and the judge calls the answer
    related to the fact (P(neutral) < 0.5)."""
    return names_subject(question, subject) and log_related > math.log(0.5)
