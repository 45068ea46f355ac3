"""The reward log R(x) = w_prior * log p(x) + w_llm * log p(y|x), with each named term kept (for logging and replay).

- p(x): a prior causal LM that shares the policy's tokenizer and scores its token ids directly.
- p(y|x): a response oracle. Every oracle implements `score(texts) -> list[OracleResult]`; local Hugging Face
  models live here, the OpenAI / OpenAI-compatible client in api_client.py.
- Tasks say how x becomes a request: system prompt, message layout, response length.
"""

from __future__ import annotations

import heapq
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from errors import UserError
from hf_models import (
    continuation_log_likelihoods,
    document_end_id,
    document_start_id,
    end_token_ids,
    generate_with_logprobs,
    without_adapters,
    write_then_answer,
)
from tasks import TASKS, Task  # noqa: F401  (TASKS re-exported: the oracles' table)

# ------------------------------------------------------------------------------------------------ results


@dataclass
class OracleResult:
    """One scored x. log_likelihood is the sum of y's token log-probs; it is NaN whenever valid is False."""

    response: str
    log_likelihood: float
    num_tokens: int
    truncated: bool = False  # finish_reason == "length": y is a prefix of what the LLM would have said
    valid: bool = True
    error: str | None = None  # why it is not valid: "logprob_sentinel", an API error, ...
    usage: dict = field(default_factory=dict)
    token_ids: list[int] | None = None  # y's token ids, when the oracle is a local model
    unreachable: bool = False  # failed because the server could not be reached (refused, dropped, timed out)

    @classmethod
    def failed(cls, reason: str, response: str = "", unreachable: bool = False) -> "OracleResult":
        return cls(
            response=response,
            log_likelihood=float("nan"),
            num_tokens=0,
            valid=False,
            error=reason,
            unreachable=unreachable,
        )


# The OpenAI API reports a token it did not keep in its top logprobs as -9999.0: summing it would give
# a meaningless log-likelihood, so such responses are marked invalid instead.
LOGPROB_SENTINEL = -9999.0


def sum_token_logprobs(token_logprobs: list[float]) -> tuple[float, bool]:
    """(sum, saw_sentinel)."""
    saw_sentinel = any(lp <= LOGPROB_SENTINEL + 1e-6 for lp in token_logprobs)
    return (float("nan") if saw_sentinel else math.fsum(token_logprobs)), saw_sentinel


# -------------------------------------------------------------------------------------------------- prior


class PriorScorer:
    """log p(x) under a causal LM, teacher-forced after a document-start token, batched.

    By default the probability of ending the text (EOS after x) is NOT included: x is a snippet, and the
    policy's own stop action already decides lengths; `include_eos=True` adds log p(EOS | x), which makes
    p(x) a distribution over complete texts and strongly favours short, complete ones."""

    def __init__(self, model, tokenizer, include_eos: bool = False, batch_size: int = 32) -> None:
        self.model = model
        self.start_id = document_start_id(tokenizer)
        self.eos_id = document_end_id(tokenizer)
        self.include_eos = include_eos
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def log_prob(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) float32 log p(x) for x = tokens[i, :lengths[i]]."""
        prefix = self.prefix_log_probs(tokens, lengths)
        return prefix.gather(1, lengths.cpu().unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def prefix_log_probs(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, width + 1): column t is log p(x_1..x_t) (plus log p(EOS | x_1..x_t) with include_eos), for every
        prefix up to each row's length, from the same single teacher-forced pass; columns past a row's length
        repeat its full value (never used)."""
        out = []
        for start in range(0, tokens.shape[0], self.batch_size):
            out.append(
                self._prefix_batch(tokens[start : start + self.batch_size], lengths[start : start + self.batch_size])
            )
        width = max(o.shape[1] for o in out)
        return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=float("nan")) for o in out])

    def _prefix_batch(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        tokens, lengths = tokens.to(self.device), lengths.to(self.device)
        width = int(lengths.max())
        tokens = tokens[:, :width]
        # Right padding is harmless for a causal model: padded positions come after every scored one.
        start = torch.full((tokens.shape[0], 1), self.start_id, dtype=torch.long, device=self.device)
        with without_adapters(self.model):
            logits = self.model(input_ids=torch.cat([start, tokens], dim=1)).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)  # (B, width + 1, V)
        token_lp = log_probs[:, :width].gather(2, tokens.unsqueeze(2)).squeeze(2)
        positions = torch.arange(width, device=self.device).unsqueeze(0)
        token_lp = token_lp * (positions < lengths.unsqueeze(1))
        prefix = torch.cat([torch.zeros_like(token_lp[:, :1]), token_lp.cumsum(dim=1)], dim=1)  # (B, width + 1)
        if self.include_eos:
            prefix = prefix + log_probs[:, :, self.eos_id]
        return prefix.cpu()


# ------------------------------------------------------------------------------------ local HF oracle


class Oracle(Protocol):
    """The response oracle's seam: anything that scores x. Local models live here, the OpenAI / OpenAI-compatible
    client in api_client.py. What an oracle can do is declared by its attributes, not inferred from its class."""

    deterministic: bool  # the same x always gets the same log p(y|x) (a fixed target, scored locally)
    has_spending: bool  # it pays for answers: has stats(), cost, run_id and a spend ledger

    def score(self, texts: list[str]) -> list[OracleResult]: ...  # optional: token_ids=... (same vocabulary)


ORACLE_FORMATS = ("auto", "chat", "plain")


def first_index(ids: list[int], stops: set[int]) -> int:
    """The position of the first id in `stops`, or len(ids): where a written text is cut."""
    return next((j for j, t in enumerate(ids) if t in stops), len(ids))


class HFResponseOracle:
    """A local Hugging Face causal LM as the LLM: samples y ~ p(.|x) at `temperature` (greedy when 0),
    and returns log p(y|x) under the untempered model, including the end-of-turn token when y ends with one
    (the OpenAI API does not report that token, so its figures exclude it).

    With `target_response`, y is fixed and log p(y*|x) is computed by teacher forcing instead.

    `prompt_format`: "chat" renders the task's messages with the tokenizer's chat template (an instruct model's
    default system prompt included, when its template adds one); "plain" is the document-start token followed
    by the task's plain prompt (for --task raw: x itself), what a base or memorising model saw in training;
    "auto" is chat when the tokenizer has a template, else plain. x enters the prompt as token ids: the policy's
    own ids when the caller passes them (same vocabulary), never a decode-and-re-encode of them."""

    has_spending = False

    def __init__(
        self,
        model,
        tokenizer,
        task: Task,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        target_response: str | None = None,
        batch_size: int = 16,
        prompt_format: str = "auto",
    ) -> None:
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens or task.max_response_tokens
        self.batch_size = batch_size
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if prompt_format not in ORACLE_FORMATS:
            raise ValueError(f"prompt_format must be one of {ORACLE_FORMATS}, got {prompt_format!r}")
        if prompt_format == "chat" and not has_template:
            raise UserError("--oracle-format chat: the oracle's tokenizer has no chat template; use plain or auto")
        self.prompt_format = (
            "chat" if prompt_format == "chat" or (prompt_format == "auto" and has_template) else "plain"
        )
        self.prompt_before, self.prompt_after = self._prompt_around_x()
        self.target_ids = None
        if target_response is not None:
            self.target_ids = tokenizer(target_response, add_special_tokens=False)["input_ids"]
            if not self.target_ids:
                raise ValueError("--target-response tokenizes to nothing")
        self.deterministic = self.target_ids is not None  # teacher forcing a fixed y*: log p(y*|x) is a function of x
        self.search: BranchSearch | None = None  # proposals by search (start_search) instead of sampling
        self.eos_ids = end_token_ids(model, tokenizer)
        if self.prompt_format == "plain":
            # the plain prompt opens a document: y is the rest of it, and it ends at the document end (SmolLM2's
            # <|endoftext|> is not its EOS); what a model writes after that is another document, not a reply to x
            self.eos_ids = self.eos_ids | {document_end_id(tokenizer)}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prompt_around_x(self) -> tuple[list[int], list[int]]:
        """(ids before x, ids after x). The prompt is rendered once around a marker and split there, so that x
        can be spliced in as ids; the marker uses private-use characters that no template or task contains."""
        marker = "\ue000x\ue000"
        if self.prompt_format == "chat":
            text = self.tokenizer.apply_chat_template(
                self.task.messages(marker), add_generation_prompt=True, tokenize=False
            )
            prefix = []  # the template writes its own start tokens
        else:
            text = self.task.plain_prompt(marker)
            prefix = [document_start_id(self.tokenizer)]  # so that an empty prompt still has a context
        before, found, after = text.partition(marker)
        if not found:
            raise UserError("the oracle's chat template drops the user message; use --oracle-format plain")

        def encode(piece: str) -> list[int]:
            return self.tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []

        return prefix + encode(before), encode(after)

    def prompt_ids(self, x: str | list[int]) -> list[int]:
        """The oracle's input for x, given as text (encoded here) or as token ids (used as they are)."""
        x_ids = list(x) if not isinstance(x, str) else self.tokenizer(x, add_special_tokens=False)["input_ids"]
        return self.prompt_before + x_ids + self.prompt_after

    def start_search(self, width: int = 256) -> None:
        """Propose by best-first search (`BranchSearch`) instead of sampling from now on."""
        self.search = BranchSearch(self.model, self.prompt_before, self.eos_ids, self.tokenizer.pad_token_id, width)

    def propose(self, num: int, max_new_tokens: int, first_seed: int = 0, start_text: str = "") -> list[list[int]]:
        """x written by this model itself: `num` samples at temperature 1 of what it puts where x goes in its
        prompt (continuing the prompt's part before x: for plain raw text, the document start), up to
        max_new_tokens of its own ids each, cut before its first end token. A model that has memorised text
        writes it here (Carlini et al. 2021 sample the target model itself), so these are exploration proposals
        no prior-initialised policy would make. Sampled from torch's RNG, or, after `start_search`, the search's
        next branches; first_seed and start_text are for API oracles (its prompt has its own document start)."""
        if self.search is not None:
            return self.search.next(num, max_new_tokens)
        generated, _ = generate_with_logprobs(
            self.model, [self.prompt_before] * num, max_new_tokens, self.eos_ids, self.tokenizer.pad_token_id, 1.0
        )
        return [ids[: first_index(ids, self.eos_ids)] for ids in generated]

    def write_and_answer(
        self, num: int, min_len: int, max_len: int, x_stops: set[int]
    ) -> list[tuple[list[int], OracleResult | None]]:
        """`propose` and `score` in one generation each: this model writes x where x goes in its prompt (the
        search's next branch continued greedily up to max_len tokens, or, without a search, a sample at
        temperature 1 up to a length drawn uniformly from [min_len, max_len], torch's RNG), ending it before an end
        token or a token in `x_stops`, then reads the prompt's part after x and answers it as `score` would (y at
        this oracle's temperature, log p(y|x) under the untempered model). What one sampling call of a memorising
        model returns: its opening and what it goes on to write. Returns (x ids, the result), the result None
        for an x shorter than min_len (the call is spent all the same)."""
        minimum = max(min_len, 1)
        stops = self.eos_ids | set(x_stops)
        if self.search is not None:
            popped = self.search.pop(num)
            prefixes = [list(prefix) for _, prefix in popped]
            limits = [max_len - len(prefix) for prefix in prefixes]
        else:
            prefixes = [[] for _ in range(num)]
            limits = [int(torch.randint(minimum, max_len + 1, ()).item()) for _ in range(num)]
        written = []
        for start in range(0, len(prefixes), self.batch_size):
            part = range(start, min(start + self.batch_size, len(prefixes)))
            written += write_then_answer(
                self.model,
                [self.prompt_before + prefixes[i] for i in part],
                [limits[i] for i in part],
                [minimum - len(prefixes[i]) for i in part],
                stops,
                self.prompt_after,
                self.max_new_tokens,
                self.eos_ids,
                self.tokenizer.pad_token_id,
                x_temperature=0.0 if self.search is not None else 1.0,
                answer_temperature=self.temperature,
                keep_x_log_probs=self.search is not None,
            )
        results = []
        for i, row in enumerate(written):
            if self.search is not None:
                log_p, prefix = popped[i]
                self.search.expand(log_p, prefix, row.x, row.x_step_log_probs, row.x_log_probs, max_len, stops)
            answer = None
            if row.answer is not None:
                answer = OracleResult(
                    response=self.tokenizer.decode(row.answer),
                    log_likelihood=math.fsum(row.answer_log_probs),
                    num_tokens=len(row.answer),
                    truncated=row.truncated,
                    token_ids=row.answer,
                )
            results.append((prefixes[i] + row.x, answer))
        return results

    def score(self, texts: list[str], token_ids: list[list[int]] | None = None) -> list[OracleResult]:
        """Score each x; with `token_ids` (same vocabulary as this oracle) the ids are used and texts ignored."""
        inputs = token_ids if token_ids is not None else texts
        results = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = [self.prompt_ids(x) for x in inputs[start : start + self.batch_size]]
            results.extend(self._score_target(chunk) if self.target_ids is not None else self._sample_and_score(chunk))
        return results

    @torch.no_grad()
    def _score_target(self, prompts: list[list[int]]) -> list[OracleResult]:
        rows = [p + self.target_ids for p in prompts]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        with without_adapters(self.model):
            log_probs = torch.log_softmax(self.model(input_ids=input_ids).logits.float(), dim=-1)
        target = torch.tensor(self.target_ids, device=self.device)
        results = []
        for i, prompt in enumerate(prompts):
            # logits at position j predict token j + 1
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target), device=self.device)
            total = log_probs[i, positions].gather(1, target.unsqueeze(1)).sum().item()
            results.append(
                OracleResult(
                    response=self.tokenizer.decode(self.target_ids),
                    log_likelihood=total,
                    num_tokens=len(target),
                    token_ids=list(self.target_ids),
                )
            )
        return results

    def _sample_and_score(self, prompts: list[list[int]]) -> list[OracleResult]:
        generated, token_lp = generate_with_logprobs(
            self.model, prompts, self.max_new_tokens, self.eos_ids, self.tokenizer.pad_token_id, self.temperature
        )
        results = []
        for i, ids in enumerate(generated):
            end = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
            num = len(ids) if end is None else end + 1  # the end-of-turn token belongs to y
            results.append(
                OracleResult(
                    response=self.tokenizer.decode(ids[:num]),  # exactly: special tokens mark y's boundaries
                    log_likelihood=float(token_lp[i, :num].double().sum()),
                    num_tokens=num,
                    truncated=end is None,
                    token_ids=ids[:num],
                )
            )
        return results


class BranchSearch:
    """Oracle proposals without repeats: a best-first enumeration of what a local LM writes after `prompt`.

    Each proposal pops the most probable unexplored branch (a prefix ending in a token that is not the model's
    greedy choice there), writes its greedy continuation (one call: the same forward passes give the next-token
    distribution at every position of it), and pushes the `width` most probable other tokens at each of those
    positions as new branches, scored by the log-probability of the whole prefix. Every sequence is one branch
    off one greedy path, so nothing is proposed twice. A model that memorised a text leaves its greedy path at
    one token and follows the text greedily from there (on the extraction victim every secret's opening has one
    token of rank 1-2,624, the rest rank 0), so its memorised texts come out roughly in order of probability.
    The frontier keeps its best MAX_FRONTIER branches."""

    MAX_FRONTIER = 100_000

    def __init__(self, model, prompt: list[int], end_ids: set[int], pad_id: int, width: int = 256) -> None:
        self.model, self.prompt, self.end_ids, self.pad_id, self.width = model, list(prompt), end_ids, pad_id, width
        self.frontier: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]  # heap of (-log p(prefix), prefix)

    def pop(self, num: int) -> list[tuple[float, tuple[int, ...]]]:
        """The `num` most probable unexplored branches, as (log p(prefix), prefix)."""
        return [
            (-negative, prefix)
            for negative, prefix in (heapq.heappop(self.frontier) for _ in range(min(num, len(self.frontier))))
        ]

    def expand(
        self,
        log_p: float,
        prefix: tuple[int, ...],
        path: list[int],
        step_log_probs,
        token_log_probs,
        limit: int,
        skip: set[int],
    ) -> None:
        """Push the branches off one greedy `path` written after `prefix`: at each position j with a next-token
        distribution step_log_probs[j] (the path's token there is its greedy choice, or a stop token in `skip`
        past its end), the `width` most probable other tokens not in `skip`, for prefixes of at most `limit`."""
        for j, step in enumerate(step_log_probs):
            if len(prefix) + j >= limit:
                break
            chosen = path[j] if j < len(path) else None
            top = torch.topk(step, self.width + 1)
            for value, token in zip(top.values.tolist(), top.indices.tolist()):
                if token != chosen and token not in skip:
                    heapq.heappush(self.frontier, (-(log_p + value), prefix + tuple(path[:j]) + (token,)))
            if j < len(path):
                log_p += float(token_log_probs[j])
        if len(self.frontier) > 2 * self.MAX_FRONTIER:
            self.frontier = heapq.nsmallest(self.MAX_FRONTIER, self.frontier)
            heapq.heapify(self.frontier)

    @torch.no_grad()
    def next(self, num: int, max_new_tokens: int) -> list[list[int]]:
        """The next `num` branches' texts (ids after the prompt, up to max_new_tokens, cut before an end token)."""
        popped = self.pop(num)
        if not popped:
            return []
        prompts = [self.prompt + list(prefix) for _, prefix in popped]
        generated, token_lp, step_lp = generate_with_logprobs(
            self.model, prompts, max_new_tokens, self.end_ids, self.pad_id, 0.0, step_log_probs=True
        )
        written = []
        for row, (log_p, prefix) in enumerate(popped):
            path = generated[row][: max(max_new_tokens - len(prefix), 0)]
            end = first_index(path, self.end_ids)
            reached = min(end + 1, len(path))  # alternatives up to and including the end token
            self.expand(
                log_p, prefix, path[:reached], step_lp[row, :reached], token_lp[row], max_new_tokens, self.end_ids
            )
            written.append(list(prefix) + path[:end])
        return written

    def state_dict(self) -> dict:
        return {"frontier": list(self.frontier), "width": self.width}

    def load_state_dict(self, state: dict) -> None:
        self.frontier, self.width = list(state["frontier"]), state["width"]
        heapq.heapify(self.frontier)


# ------------------------------------------------------------------------------------------------ reward


# A task's reward formula: named, untempered log-terms, each (B,) float64 -> (B,) log R. One per task, applied to
# fresh samples and again to replayed ones (whose stored terms it re-scores under the current schedule).
RewardFormula = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class RewardBatch:
    texts: list[str]
    terms: dict[str, torch.Tensor]  # name -> (B,) float64, e.g. log_prior = log p(x), log_likelihood = log p(y|x)
    log_reward: torch.Tensor  # (B,) formula(terms); NaN where invalid
    valid: torch.Tensor  # (B,) bool: usable for training
    oracle_results: list[OracleResult]
    formula: RewardFormula  # how log_reward was made of the terms
    extras: list[dict] | None = None  # per-sample task-specific fields for the samples file
    retokenises: list[bool] | None = None  # does encode(decode(x's ids)) give x's ids back?
    oracle_saw_text: bool = False  # True when x reached the oracle as text (an API), not as the policy's ids

    @property
    def log_prior(self) -> torch.Tensor:  # the default tasks' terms, by name
        return self.terms["log_prior"]

    @property
    def log_likelihood(self) -> torch.Tensor:
        return self.terms["log_likelihood"]

    def __getitem__(self, part: slice) -> "RewardBatch":
        """The rows in `part` (a slice), every per-row field cut the same way."""
        return RewardBatch(
            self.texts[part],
            {name: term[part] for name, term in self.terms.items()},
            self.log_reward[part],
            self.valid[part],
            self.oracle_results[part],
            self.formula,
            self.extras[part] if self.extras else None,
            self.retokenises[part] if self.retokenises is not None else None,
            self.oracle_saw_text,
        )


@dataclass(frozen=True)
class WeightedSum:
    """log R = sum of weight * term over the named terms: the default reward formula (a small picklable value: it
    travels with a batch under torchrun)."""

    weights: tuple[tuple[str, float], ...]  # (term name, weight) pairs

    def __call__(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(weight * terms[name] for name, weight in self.weights)


def stack_terms(rows: list[dict[str, float]]) -> dict[str, torch.Tensor]:
    """Per-item terms (the replay buffer's) as (B,) float64 tensors, for a RewardFormula."""
    return {name: torch.tensor([row[name] for row in rows], dtype=torch.float64) for name in rows[0]} if rows else {}


def replay_formula(formula: RewardFormula):
    """The replay buffer's batched float form of a RewardFormula."""
    return lambda rows: formula(stack_terms(rows)).tolist()


def token_id_lists(tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(tokens.cpu(), lengths.cpu().tolist())]


def padded_token_ids(rows: list[list[int]], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of token_id_lists: (tokens (B, width), zero after each row's end, and lengths (B,))."""
    tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    return tokens, torch.tensor([len(row) for row in rows], device=device)


TARGET_MATCH_TOKENS = 3  # an oracle's x is cut where it writes this many of the fixed target's first tokens


def target_start(ids: list[int], target: list[int], min_len: int, max_len: int) -> int | None:
    """The first k in [min_len, max_len] where `ids` goes on with the target's first tokens, or None."""
    if not target:
        return None
    head = target[:TARGET_MATCH_TOKENS]
    for start in range(min_len, min(max_len, len(ids) - len(head)) + 1):
        if ids[start : start + len(head)] == head:
            return start
    return None


def same_vocabulary(tokenizer, other) -> bool:
    return tokenizer is other or tokenizer.get_vocab() == other.get_vocab()


class RewardModel:
    """Combines a prior and a response oracle into log R. `oracle=None` or llm_weight == 0 skips the oracle
    (no calls are made); `prior_weight == 0` still scores the prior, for logging.

    Counting: `reward_calls` is every reward evaluation (each x and each prefix scored), `oracle_calls` every
    one that reached the oracle. A deterministic oracle (a fixed target scored locally) is asked about each x or
    prefix once per run: answers are kept in `known_likelihoods`, so replayed samples and modified SubTB's
    prefixes (the full x among them) are never scored twice."""

    def __init__(
        self,
        tokenizer,
        prior: PriorScorer,
        oracle=None,
        prior_weight: float = 1.0,
        llm_weight: float = 1.0,
        reference_weight: float = 0.0,
    ) -> None:
        self.tokenizer, self.prior, self.oracle = tokenizer, prior, oracle
        self.prior_weight, self.llm_weight, self.reference_weight = prior_weight, llm_weight, reference_weight
        self._takes_ids: tuple[object, bool] = (None, False)  # (oracle, decision), see oracle_takes_ids
        self.known_likelihoods: dict[tuple[int, ...], float] = {}
        self.reward_calls = 0
        self.oracle_calls = 0
        self.proposal_calls = 0  # x written by the oracle itself (propose_x); also in both counts above
        self.answer_proposals_in_place = True  # see answers_proposals
        self.counter_lock = threading.Lock()  # the prefetch thread queries the oracle too

    @property
    def formula(self) -> WeightedSum:
        """The reward formula, in one place: log R = w_prior * log p(x) + w_llm * log p(y|x), minus
        w_ref * log p_prior(y|x) (the `log_reference` term) when a reference weight is set."""
        weights = (("log_prior", self.prior_weight), ("log_likelihood", self.llm_weight))
        return WeightedSum(weights + ((("log_reference", -self.reference_weight),) if self.reference_weight else ()))

    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(ids) for ids in token_id_lists(tokens, lengths)]

    def __call__(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        texts: list[str] | None = None,
        answered: list[OracleResult] = (),
    ) -> RewardBatch:
        """log R of each x; `answered`: the oracle's results for the first rows, already paid for
        (propose_answered), so only the rest are sent."""
        texts = self.decode(tokens, lengths) if texts is None else texts
        results = None
        if self.uses_oracle:
            known = len(answered)
            rest = self.query_oracle(tokens[known:], lengths[known:], texts[known:]) if known < len(texts) else []
            results = list(answered) + rest
        return self.combine(tokens, lengths, texts, results)

    @property
    def oracle_takes_ids(self) -> bool:
        """A local oracle with the prior's vocabulary scores the policy's own ids: decoding and re-encoding them
        changed 8-19% of x on SmolLM2. Any other oracle (an API) receives text. Decided once per oracle."""
        if self._takes_ids[0] is not self.oracle:
            takes = isinstance(self.oracle, HFResponseOracle) and same_vocabulary(self.oracle.tokenizer, self.tokenizer)
            self._takes_ids = (self.oracle, takes)
        return self._takes_ids[1]

    @property
    def uses_oracle(self) -> bool:
        return self.oracle is not None and self.llm_weight != 0

    @property
    def deterministic_oracle(self) -> bool:
        return self.uses_oracle and getattr(self.oracle, "deterministic", False)

    def forget_evaluations(self) -> None:
        """Zero the counts and the deterministic oracle's answers: for evaluations that are not the run's own
        (a benchmark's enumeration or baseline before training)."""
        self.reward_calls = self.oracle_calls = 0
        self.known_likelihoods.clear()

    def count(self, num_rewards: int, num_oracle: int, num_proposals: int = 0) -> None:
        with self.counter_lock:
            self.reward_calls += num_rewards
            self.oracle_calls += num_oracle
            self.proposal_calls += num_proposals

    def query_oracle(self, tokens: torch.Tensor, lengths: torch.Tensor, texts: list[str]) -> list[OracleResult]:
        """The oracle's results for these x (token ids for a local oracle with our vocabulary, else texts).
        Counts the oracle calls; `combine` counts the reward evaluations."""
        ids = token_id_lists(tokens, lengths)
        if not self.deterministic_oracle:
            self.count(0, len(texts))
            return self.oracle.score(texts, token_ids=ids) if self.oracle_takes_ids else self.oracle.score(texts)
        return self._deterministic_results(ids, texts)

    def _deterministic_results(self, ids: list[list[int]], texts: list[str]) -> list[OracleResult]:
        """Score only what this run has not scored before (and each distinct x once)."""
        missing = list(dict.fromkeys(tuple(row) for row in ids if tuple(row) not in self.known_likelihoods))
        if missing:
            rows = [list(key) for key in missing]
            fresh = (
                self.oracle.score([], token_ids=rows)
                if self.oracle_takes_ids
                else self.oracle.score([self.tokenizer.decode(row) for row in rows])
            )
            self.count(0, len(rows))
            for key, result in zip(missing, fresh):
                self.known_likelihoods[key] = result.log_likelihood
        target_ids = list(self.oracle.target_ids)
        response = self.oracle.tokenizer.decode(target_ids)
        return [
            OracleResult(
                response=response,
                log_likelihood=self.known_likelihoods[tuple(row)],
                num_tokens=len(target_ids),
                token_ids=target_ids,
            )
            for row in ids
        ]

    @property
    def can_propose(self) -> bool:
        """The oracle can write x itself (a local Hugging Face model, or a completions endpoint)."""
        return self.uses_oracle and hasattr(self.oracle, "propose")

    def propose_x(self, num: int, min_len: int, max_len: int, banned: set[int]) -> list[list[int]]:
        """Up to `num` x written by the oracle itself (`propose` of HFResponseOracle, or of OpenAIChatOracle on a
        completions endpoint), in the prior's vocabulary: a local oracle's own ids when it shares it, else the
        text encoded by the prior's tokenizer. Each row is cut before its first token the policy may not emit,
        then where it goes on with the fixed target y* (a local oracle with our vocabulary and --target-response:
        the row that starts y* after k tokens is cut at k, the opening that made the oracle write y*), else a
        search's branch keeps its whole text up to max_len and a sampled row is cut to a length drawn uniformly
        from [min_len, its length] (torch's RNG), so that openings of every length are proposed. Rows shorter
        than min_len are dropped (the caller fills the batch). Every proposal is an oracle call, counted in
        `reward_calls` and `oracle_calls` (a budget in calls covers them) and in `proposal_calls`."""
        if not self.can_propose:
            raise ValueError("oracle proposals need an oracle that writes x: --oracle hf, or openai with plain format")
        target = list(getattr(self.oracle, "target_ids", None) or []) if self.oracle_takes_ids else []
        # with a target, room to write its first tokens after an opening of max_len
        room = max_len + min(TARGET_MATCH_TOKENS, len(target))
        # an API's requests are seeded, and prompted with the prior's document start when x opens the text
        start_text = self.tokenizer.decode([document_start_id(self.tokenizer)])
        written = self.oracle.propose(num, room, first_seed=self.proposal_calls, start_text=start_text)
        self.count(len(written), len(written), num_proposals=len(written))  # a search may run out of branches
        if written and isinstance(written[0], str):  # an API's text
            written = self.tokenizer(written, add_special_tokens=False)["input_ids"]
        elif not self.oracle_takes_ids:
            written = self.tokenizer([self.oracle.tokenizer.decode(ids) for ids in written], add_special_tokens=False)[
                "input_ids"
            ]
        rows, searching = [], getattr(self.oracle, "search", None) is not None
        for ids in written:
            ids = list(ids)[: first_index(ids, banned)]
            start = target_start(ids, target, max(min_len, 1), max_len)
            ids = ids[:start] if start is not None else ids[:max_len]
            if len(ids) < max(min_len, 1):
                continue
            if start is None and not searching:  # a sample: an opening of a random length
                ids = ids[: int(torch.randint(max(min_len, 1), len(ids) + 1, ()).item())]
            rows.append(ids)
        return rows

    @property
    def answers_proposals(self) -> bool:
        """The oracle answers the x it writes in the same generation (`propose_answered`, one call each): a local
        oracle with the prior's vocabulary and a sampled y, unless --separate-proposal-answers."""
        return (
            self.answer_proposals_in_place
            and self.can_propose
            and self.oracle_takes_ids
            and not self.deterministic_oracle
            and hasattr(self.oracle, "write_and_answer")
        )

    def propose_answered(
        self, num: int, min_len: int, max_len: int, banned: set[int]
    ) -> tuple[list[list[int]], list[OracleResult]]:
        """Up to `num` x written by the oracle and its answer to each, from one generation each
        (HFResponseOracle.write_and_answer): what `propose_x` and scoring them would give, for one call instead of
        two. Each generation is counted in `oracle_calls` and `proposal_calls`; the reward evaluations are counted
        when the rows are combined (`__call__` with `answered`). x shorter than min_len are dropped."""
        written = self.oracle.write_and_answer(num, min_len, max_len, banned)
        self.count(0, len(written), num_proposals=len(written))
        kept = [(x, result) for x, result in written if result is not None]
        return [x for x, _ in kept], [result for _, result in kept]

    def proposal_state(self) -> dict | None:
        """What a checkpoint keeps of the oracle's proposals (a search's frontier), so a resumed run goes on."""
        search = getattr(self.oracle, "search", None)
        return search.state_dict() if search is not None else None

    def load_proposal_state(self, state: dict | None) -> None:
        search = getattr(self.oracle, "search", None)
        if search is not None and state is not None:
            search.load_state_dict(state)

    def can_score_prefixes(self) -> bool:
        """Prefix rewards need a deterministic oracle: none, or a local model with a fixed target (and no
        reference term, which needs each prefix's own y)."""
        return not self.uses_oracle or (self.deterministic_oracle and not self.reference_weight)

    def reference_log_likelihoods(
        self, tokens: torch.Tensor, lengths: torch.Tensor, results: list[OracleResult]
    ) -> torch.Tensor:
        """(B,) float64 log p_prior(y|x): the oracle's answer y scored by the prior after x (teacher-forced, adapters
        off). y is the oracle's own token ids when it shares the prior's vocabulary, else its text re-encoded. A
        failed answer scores NaN (its row is invalid anyway)."""
        if self.oracle_takes_ids:
            answers = [list(r.token_ids or []) for r in results]
        else:
            encoded = self.tokenizer([r.response for r in results], add_special_tokens=False)["input_ids"]
            answers = [list(ids) for ids in encoded]
        scores = continuation_log_likelihoods(
            self.prior.model, self.prior.start_id, token_id_lists(tokens, lengths), answers
        )
        return torch.tensor(
            [score if result.valid else float("nan") for score, result in zip(scores, results)], dtype=torch.float64
        )

    @torch.no_grad()
    def prefix_log_rewards(self, tokens: torch.Tensor, lengths: torch.Tensor, min_len: int = 1) -> torch.Tensor:
        """(B, max_len + 1): log R(x_1..x_t) for every prefix with min_len <= t <= length (others NaN), for the
        modified SubTB loss. The prior costs one pass; a fixed-target local oracle scores each prefix it has not
        scored before as its own row (batched). Every proper prefix counts as a reward evaluation, each time."""
        if not self.can_score_prefixes():
            raise ValueError("prefix rewards need --llm-weight 0 or a local oracle with --target-response")
        batch, max_len = tokens.shape
        steps = torch.arange(max_len + 1).unsqueeze(0)
        usable = (steps >= min_len) & (steps <= lengths.cpu().unsqueeze(1))
        prior = self.prior.prefix_log_probs(tokens, lengths).double()[:, : max_len + 1]
        log_prior = torch.full((batch, max_len + 1), float("nan"), dtype=torch.float64)
        log_prior[:, : prior.shape[1]] = prior
        likelihood = torch.zeros_like(log_prior)
        rows, cols = usable.nonzero(as_tuple=True)
        # every proper prefix is a reward evaluation; the full x was counted when it was scored (combine)
        self.count(int((usable & (steps < lengths.cpu().unsqueeze(1))).sum()), 0)
        if self.uses_oracle:
            prefixes = [tokens[r, :c].tolist() for r, c in zip(rows.tolist(), cols.tolist())]
            results = self._deterministic_results(prefixes, [])
            likelihood = torch.full_like(log_prior, float("nan"))
            likelihood[rows, cols] = torch.tensor([r.log_likelihood for r in results], dtype=torch.float64)
        log_reward = self.formula({"log_prior": log_prior, "log_likelihood": likelihood})
        return torch.where(usable, log_reward, torch.full_like(log_reward, float("nan")))

    def combine(
        self, tokens: torch.Tensor, lengths: torch.Tensor, texts: list[str], results: list[OracleResult] | None
    ) -> RewardBatch:
        """log R from the prior and oracle results obtained elsewhere (live, or from a Batch API round)."""
        log_prior = self.prior.log_prob(tokens, lengths).double()
        self.count(len(texts), 0)
        if results is not None:
            log_likelihood = torch.tensor([r.log_likelihood for r in results], dtype=torch.float64)
            valid = torch.tensor([r.valid for r in results], dtype=torch.bool)
        else:
            results = [OracleResult(response="", log_likelihood=0.0, num_tokens=0) for _ in texts]
            log_likelihood = torch.zeros(len(texts), dtype=torch.float64)
            valid = torch.ones(len(texts), dtype=torch.bool)
        terms = {"log_prior": log_prior, "log_likelihood": log_likelihood}
        if self.reference_weight and self.uses_oracle:
            terms["log_reference"] = self.reference_log_likelihoods(tokens, lengths, results)
        log_reward = self.formula(terms)
        valid &= torch.isfinite(log_reward)
        ids = token_id_lists(tokens, lengths)
        reencoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # one batched call
        retokenises = [again == row for again, row in zip(reencoded, ids)]
        return RewardBatch(
            texts,
            terms,
            log_reward,
            valid,
            results,
            self.formula,
            retokenises=retokenises,
            oracle_saw_text=self.uses_oracle and not self.oracle_takes_ids,
        )
