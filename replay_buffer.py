"""A replay buffer of high-reward samples x, mixed into GFlowNet training batches (as in Hu et al. 2024,
"Amortizing intractable inference in large language models", and Lee et al. 2024, "Learning diverse attacks on
large language models for robust red-teaming and safety tuning").

An item is a sequence of token ids plus its text, stored with its UNTEMPERED, named reward terms (e.g. log p(x)
`log_prior` and log p(y|x) `log_likelihood`; the contradiction task's `log_contradiction`, `log_question`,
`log_answer`) and JSON extras (e.g. the response y). No score is stored: every `add` and `sample` takes the
reward formula (`log_reward`, terms -> log R, batched) and recomputes each item's log R from its terms, so a
schedule that changes the weights, the reward temperature or the task's reward phase re-scores everything
already stored.

Two backends with identical behaviour: "memory" (a dict per condition, guarded by a lock) and "redis" (shared by
several processes). The rules, per condition ("" when the task is unconditional):

1. Capacity per condition. Each condition (e.g. each subject of a conditional task) holds at most `capacity`
   items. When it is full, a new item whose log reward is higher than the current minimum evicts the minimum
   (among equal minima, the one inserted last); otherwise it is not stored. Eviction compares log rewards computed
   with the formula passed to this `add`, recomputed for the stored items too, from their stored terms, so a
   changed schedule is applied consistently at add time and again at sample time.
2. Exact duplicates (same token_ids in the same condition) are never stored twice. A duplicate with a strictly
   higher log reward (its terms can differ, e.g. a re-sampled y) replaces the stored one; otherwise it is
   dropped.
3. Near duplicates: two items are near duplicates when the Jaccard similarity of their sets of token bigrams
   (unigrams for a sequence of fewer than 2 tokens) is >= `near_duplicate_threshold` (a threshold > 1 turns this
   off). A new item that is a near duplicate of stored items is compared with the best of them: if it scores
   strictly higher it replaces them all (every stored near duplicate is removed), otherwise it is dropped. An
   exact duplicate is handled the same way (it is a near duplicate with similarity 1). A replacement (rules 2
   and 3) counts as a new insertion for tie-breaking. Cost: a gram index with prefix filtering finds the
   candidates, so each new item costs at most O(capacity), usually far less; fine up to ~10k items per condition.
4. Sampling, with replacement, `n` items (or [] for an empty condition), deterministic given `generator`. Items
   are ranked by log reward / reward_temperature, computed with the formula passed to `sample`, descending, ties
   broken by insertion order (earliest first). Then:
     - "rank" (default): P(rank r) proportional to 1 / (rank_k + r)^rank_power, r = 0 for the best (rank-based
       prioritisation, Schaul et al. 2016). Default rank_k = 1.0, rank_power = 1: the best item gets 1/H_n of the
       draws (about 0.44 of them for 5 items, 0.13 for 1000), so sampling never collapses onto the top item
       whatever the reward scale; but half the draws go below the top 20 of 1,000. rank_power 2 keeps 97% of
       them in the top 20 (the best item 61%). Dividing by reward_temperature does not change ranks, so in this
       mode only the formula matters.
     - "tempered": P proportional to exp(log_reward / (reward_temperature * priority_temperature)).
     - "uniform": every stored item equally likely.
   With `novelty_after` N > 0 (rank priority only), items whose text + response (`text` + `extra["y"]`) has been
   seen N times or more are ranked after every other item, by log reward among themselves: an x whose answer
   keeps repeating (a mode already mined, e.g. a memorised record leaked again) gives way to x whose answers are
   new. A text is seen once per item added (admitted or not) that shares any of its NOVELTY_WINDOW-word windows
   (the whole text when shorter), so a memorised record counts as seen whatever the oracle wrote after it. The
   counts are kept per condition, in the checkpoint (memory) or in Redis (shared by every writer), and grow with
   the rows added (one 16-hex-digit key per distinct window, about a dozen a row).
   With `stale_prefix_after` S > 0 as well (and `prefix_back` B), an item whose x without its last B tokens (the
   prefix local search keeps of it, so the neighbourhood it explores) has been the prefix of S added items whose
   response repeated one seen before goes last too: a neighbourhood whose new endings keep making the oracle
   repeat itself (a family of records mined out, or a policy that writes one ending) is given up, even while its
   own items' answers were seen fewer than N times. Within one `add`, items count in order. The repeat counts
   live beside the window counts (keys `prefix:...`).
   Both backends fetch the items and do the probability computation and the draw in Python
   (`generator.choices`), so the same seed and insert sequence give the same samples from either.
5. Redis layout, for namespace N and condition C: a hash `N:C:items` (item id -> JSON of the item and its
   insertion number), a counter `N:C:next_seq` (insertion numbers, for tie-breaks), a set `N:conditions`, and
   with novelty a hash `N:C:responses` (window id -> count, HINCRBY).
   The item id is a hash of token_ids, so one field per sequence. `add` reads a condition, decides in Python
   and writes inside a WATCH/MULTI transaction that is retried if another writer touched the condition in the
   meantime, so concurrent processes cannot exceed capacity, store duplicates or lose an update. Each `add` and
   `sample` therefore reads the whole condition: about 0.1-0.5 s per call at 10k items (the `hiredis` package
   speeds up the reading); the memory backend's `add` is about 0.1 s there and its `sample` 10 ms. Nothing but
   items (and the novelty counts) is stored; `clear()` deletes only keys `N:*` (N may not contain ':', so no
   namespace prefixes another). An unreachable server raises `ReplayBufferConnectionError` naming the URL
   (password redacted).

Reward terms, and the log rewards the formula makes of them, must be finite (a NaN or an infinite log reward
cannot be ranked): `add` raises ValueError.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import heapq
import json
import math
import random
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis

from errors import UserError

BACKENDS = ("memory", "redis")
PRIORITIES = ("rank", "tempered", "uniform")
DEFAULT_RANK_K = 1.0
NOVELTY_WINDOW = 8  # words: a response seen again shares an 8-word window with the earlier one


@dataclass
class ReplayItem:
    token_ids: list[int]
    text: str
    terms: dict[str, float]  # the reward's named terms, untempered, e.g. {"log_prior": .., "log_likelihood": ..}
    extra: dict = field(default_factory=dict)  # JSON-serialisable; stored and returned as-is


# The reward formula: the terms of many items -> their log rewards (batched, so a task can use tensors).
LogRewardFormula = Callable[[list[dict[str, float]]], list[float]]


def sum_of_terms(rows: list[dict[str, float]]) -> list[float]:
    return [math.fsum(terms.values()) for terms in rows]


def weighted(**weights: float) -> LogRewardFormula:
    """log R = sum of weight * term over the named terms (a term without a weight does not count)."""
    for name, weight in weights.items():
        _finite(name, weight)
    return lambda rows: [math.fsum(w * terms[name] for name, w in weights.items()) for terms in rows]


class ReplayBuffer(Protocol):
    def add(self, items: list[ReplayItem], condition: str = "", log_reward: LogRewardFormula = sum_of_terms) -> int: ...

    def sample(
        self,
        n: int,
        condition: str = "",
        log_reward: LogRewardFormula = sum_of_terms,
        reward_temperature: float = 1.0,
        generator: random.Random | None = None,
    ) -> list[ReplayItem]: ...

    def __len__(self) -> int: ...

    def size(self, condition: str = "") -> int: ...

    def conditions(self) -> list[str]: ...

    def clear(self) -> None: ...

    def state_dict(self) -> dict: ...  # what a checkpoint holds to restore the buffer

    def load_state_dict(self, state: dict) -> None: ...


class ReplayBufferConnectionError(UserError, ConnectionError):
    """The Redis server cannot be reached (a UserError, so the command line prints one line)."""


# ------------------------------------------------------------------------------------- shared rules


@dataclass
class _Entry:
    item: ReplayItem
    seq: int  # insertion number: ties in reward go to the earliest

    @functools.cached_property
    def grams(self) -> frozenset:  # only adds need it, so sampling never computes it
        return token_grams(self.item.token_ids)


def token_grams(token_ids: list[int]) -> frozenset:
    """The set of token bigrams, or of unigrams when there are fewer than 2 tokens."""
    if len(token_ids) < 2:
        return frozenset((t,) for t in token_ids)
    return frozenset(zip(token_ids, token_ids[1:]))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    shared = len(a & b)
    return shared / (len(a) + len(b) - shared)


def response_windows(item: ReplayItem) -> list[str]:
    """Stable ids of the NOVELTY_WINDOW-word windows of the item's x and response written as one text (lower-cased,
    whitespace-split; the whole text as one window when shorter), [] for an item without a response. x and y
    together: an x may end inside a memorised record and its y go on from there ("... file 20" + "15: Kestrel
    ..."), so the record is only whole in x + y."""
    response = item.extra.get("y")
    if not isinstance(response, str):
        return []
    words = (item.text + response).lower().split()
    windows = {" ".join(words[i : i + NOVELTY_WINDOW]) for i in range(max(1, len(words) - NOVELTY_WINDOW + 1))}
    return sorted(hashlib.blake2b(w.encode(), digest_size=8).hexdigest() for w in windows)


def times_seen(windows: list[str], counts: dict[str, int]) -> int:
    """How many added items shared a window with this response (its most repeated window's count)."""
    return max((counts.get(w, 0) for w in windows), default=0)


def prefix_key(item: ReplayItem, back: int) -> str | None:
    """Id of the item's x without its last `back` tokens (what local search keeps), None when nothing is left."""
    if len(item.token_ids) <= back:
        return None
    return "prefix:" + _item_id(item.token_ids[:-back])


def novelty_increments(items: list[ReplayItem], counts: dict[str, int], prefix_back: int | None) -> dict[str, int]:
    """What adding `items` (in order) adds to the novelty counts `counts` (read, not changed): one per window of
    each response, and with `prefix_back`, one to an item's prefix when its response repeats one seen before
    (counted before it, earlier items of `items` included)."""
    added: dict[str, int] = {}
    for item in items:
        windows = response_windows(item)
        repeats = max((counts.get(w, 0) + added.get(w, 0) for w in windows), default=0) > 0
        for window in windows:
            added[window] = added.get(window, 0) + 1
        prefix = prefix_key(item, prefix_back) if prefix_back and repeats else None
        if prefix is not None:
            added[prefix] = added.get(prefix, 0) + 1
    return added


def _item_id(token_ids: list[int]) -> str:
    """Stable id of a sequence: one field per sequence in Redis, one key per sequence in memory."""
    return hashlib.blake2b(",".join(map(str, token_ids)).encode(), digest_size=16).hexdigest()


def _gram_index(entries: dict[str, _Entry]) -> dict[tuple, set[str]]:
    """gram -> ids of the stored entries containing it (an inverted index for `_near_duplicate_ids`)."""
    index: dict[tuple, set[str]] = {}
    for item_id, entry in entries.items():
        for gram in entry.grams:
            index.setdefault(gram, set()).add(item_id)
    return index


def _near_duplicate_ids(
    grams: frozenset, entries: dict[str, _Entry], index: dict[tuple, set[str]], threshold: float
) -> set[str]:
    """Stored ids with Jaccard >= threshold, by prefix filtering: J(A, B) >= t needs |A & B| >= t|A|, so B shares
    at least one of any |A| - ceil(t|A|) + 1 grams of A. Reading only the postings of A's rarest grams skips the
    very common ones (", the"), then each candidate is checked exactly. At worst O(capacity) per item."""
    needed = math.ceil(threshold * len(grams) - 1e-9)  # the epsilon can only widen the prefix: never misses one
    rarest = sorted(grams, key=lambda g: len(index.get(g, ())))[: len(grams) - needed + 1]
    candidates = set().union(*(index.get(g, ()) for g in rarest))
    return {i for i in candidates if jaccard(grams, entries[i].grams) >= threshold}


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positive(name: str, value: object) -> float:
    if _finite(name, value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def _check_condition(condition: object) -> str:
    if not isinstance(condition, str):
        raise ValueError(f"condition must be a string, got {condition!r}")
    return condition


def _normalised(item: object) -> ReplayItem:
    """A validated copy with plain types; extra goes through JSON in both backends, so both return the same."""
    if not isinstance(item, ReplayItem):
        raise ValueError(f"items must be ReplayItem, got {type(item).__name__}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in item.token_ids):
        raise ValueError(f"token_ids must be a list of ints, got {item.token_ids!r:.80}")
    if not isinstance(item.text, str):
        raise ValueError(f"text must be a string, got {type(item.text).__name__}")
    try:
        extra = json.loads(json.dumps(item.extra, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be a JSON-serialisable dict: {e}") from None
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(item.extra).__name__}")
    if not isinstance(item.terms, dict) or not item.terms or not all(isinstance(k, str) for k in item.terms):
        raise ValueError(f"terms must be a non-empty dict of named reward terms, got {item.terms!r:.80}")
    terms = {name: _finite(name, value) for name, value in item.terms.items()}
    return ReplayItem([int(t) for t in item.token_ids], item.text, terms, extra)


def _log_rewards(formula: LogRewardFormula, rows: list[dict[str, float]]) -> list[float]:
    """The formula's log rewards for these terms, checked: one finite number per row."""
    if not rows:
        return []
    try:
        values = [float(v) for v in formula(rows)]
    except KeyError as e:
        raise ValueError(f"the reward formula needs the term {e}, which an item lacks") from None
    if len(values) != len(rows) or not all(math.isfinite(v) for v in values):
        raise ValueError(f"the reward formula must give a finite log reward per item, got {values!r:.120}")
    return values


def _checked_add_args(
    items: list[ReplayItem], condition: str, log_reward: LogRewardFormula
) -> tuple[list[ReplayItem], list[float]]:
    """The argument checks both backends' add() share; returns the normalised items and their log rewards (the
    formula's, checked before anything is stored, and computed once: _admit takes them)."""
    items = [_normalised(item) for item in items]
    _check_condition(condition)
    _check_formula(log_reward)
    return items, _log_rewards(log_reward, [item.terms for item in items])


def _check_formula(log_reward: object) -> None:
    if not callable(log_reward):
        raise ValueError(f"log_reward must be a function of the items' terms, got {log_reward!r:.80}")


def _item_from_json(d: dict) -> ReplayItem:
    """An item as both backends serialise it; items written before named terms carry log_prior/log_likelihood."""
    terms = d["terms"] if "terms" in d else {"log_prior": d["log_prior"], "log_likelihood": d["log_likelihood"]}
    return ReplayItem(list(d["token_ids"]), d["text"], terms, d["extra"])


def _admit(
    entries: dict[str, _Entry],
    index: dict[tuple, set[str]] | None,
    items: list[ReplayItem],
    new_scores: list[float],
    next_seq: int,
    log_reward: LogRewardFormula,
    capacity: int,
    near_duplicate_threshold: float,
) -> tuple[int, int]:
    """Rules 1-3 for one condition, one item at a time: updates `entries` (item id -> entry) and `index` (its
    `_gram_index`, None when near duplicates are off) in place. `new_scores` are the items' log rewards (from
    _checked_add_args); the stored items' are recomputed with this add's formula. Returns (how many items were
    stored or replaced, the next insertion number)."""
    stored_ids = list(entries)
    score = dict(zip(stored_ids, _log_rewards(log_reward, [entries[i].item.terms for i in stored_ids])))
    # Eviction order: lowest score first, and among equal scores the latest inserted. Replaced or evicted entries
    # stay in the heap and are skipped when they surface (their id is gone or carries a newer seq).
    heap = [(s, -entries[i].seq, i) for i, s in score.items()]
    heapq.heapify(heap)

    def remove(item_id: str) -> None:
        if index is not None:
            for gram in entries[item_id].grams:
                index[gram].discard(item_id)
                if not index[gram]:
                    del index[gram]  # so a long run's index holds only the grams of stored items
        del entries[item_id], score[item_id]

    admitted = 0
    for item, new_score in zip(items, new_scores):
        item_id, entry = _item_id(item.token_ids), _Entry(item, next_seq)
        rivals = {item_id} & entries.keys()  # an exact duplicate is a near duplicate with similarity 1
        if index is not None:
            rivals |= _near_duplicate_ids(entry.grams, entries, index, near_duplicate_threshold)
        if rivals:
            if new_score <= max(score[i] for i in rivals):
                continue
            for i in rivals:
                remove(i)
        elif len(entries) >= capacity:
            while heap[0][2] not in entries or entries[heap[0][2]].seq != -heap[0][1]:
                heapq.heappop(heap)  # stale
            if new_score <= heap[0][0]:
                continue
            remove(heapq.heappop(heap)[2])
        entries[item_id], score[item_id] = entry, new_score
        heapq.heappush(heap, (new_score, -entry.seq, item_id))
        if index is not None:
            for gram in entry.grams:
                index.setdefault(gram, set()).add(item_id)
        next_seq += 1
        admitted += 1
    return admitted, next_seq


def _draw(
    entries: list[_Entry],
    n: int,
    log_reward: LogRewardFormula,
    reward_temperature: float,
    priority: str,
    rank_k: float,
    priority_temperature: float,
    generator: random.Random,
    demoted: list[bool] | None = None,
    rank_power: float = 1.0,
) -> list[_Entry]:
    """Rule 4: rank by tempered log reward (ties: earliest inserted first; `demoted` items, whose response has
    been seen often, after all others), weight, draw n with replacement."""
    if not entries or n == 0:
        return []
    tempered = [value / reward_temperature for value in _log_rewards(log_reward, [e.item.terms for e in entries])]
    demoted = demoted or [False] * len(entries)
    order = sorted(range(len(entries)), key=lambda i: (demoted[i], -tempered[i], entries[i].seq))
    if priority == "rank":
        # power 1 computed as before, so that runs measured before rank_power draw the same items
        weights = [1.0 / (rank_k + r) if rank_power == 1 else (rank_k + r) ** -rank_power for r in range(len(order))]
    elif priority == "tempered":
        best = tempered[order[0]]  # subtract the max so exp cannot overflow; the best item has weight 1
        weights = [math.exp((tempered[i] - best) / priority_temperature) for i in order]
    else:
        weights = [1.0] * len(order)
    return [entries[order[r]] for r in generator.choices(range(len(order)), weights=weights, k=n)]


def _check_sample_args(n: object, condition: object, log_reward: object, reward_temperature: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    _check_condition(condition)
    _check_formula(log_reward)
    _positive("reward_temperature", reward_temperature)


class _Settings:
    """What both backends are configured with (validated by make_replay_buffer)."""

    def __init__(
        self,
        capacity: int,
        priority: str,
        rank_k: float,
        priority_temperature: float,
        near_duplicate_threshold: float,
        novelty_after: int = 0,
        rank_power: float = 1.0,
        stale_prefix_after: int = 0,
        prefix_back: int = 2,
    ) -> None:
        self.capacity, self.priority, self.rank_k = capacity, priority, rank_k
        self.priority_temperature, self.near_duplicate_threshold = priority_temperature, near_duplicate_threshold
        self.novelty_after, self.rank_power = novelty_after, rank_power
        self.stale_prefix_after, self.prefix_back = stale_prefix_after, prefix_back

    def _increments(self, items: list[ReplayItem], counts: dict[str, int]) -> dict[str, int]:
        return novelty_increments(items, counts, self.prefix_back if self.stale_prefix_after else None)

    def _novelty_keys(self, entries: list[_Entry]) -> list[tuple[list[str], str | None]]:
        """Each entry's response windows and (with stale_prefix_after) prefix key: the counts its demotion reads."""
        if not self.novelty_after:
            return []
        back = self.prefix_back if self.stale_prefix_after else None
        return [(response_windows(e.item), prefix_key(e.item, back) if back else None) for e in entries]

    def _demoted(self, keys: list[tuple[list[str], str | None]], counts: dict[str, int]) -> list[bool] | None:
        """Which entries (given _novelty_keys) were seen novelty_after times or more, or whose prefix was stale;
        None when off."""
        if not self.novelty_after:
            return None
        return [  # a prefix key is only there with stale_prefix_after > 0
            times_seen(windows, counts) >= self.novelty_after
            or (prefix is not None and counts.get(prefix, 0) >= self.stale_prefix_after)
            for windows, prefix in keys
        ]

    def _draw(self, entries, n, log_reward, reward_temperature, generator, demoted) -> list[_Entry]:
        """Rule 4 with this buffer's priority settings."""
        return _draw(
            entries,
            n,
            log_reward,
            reward_temperature,
            self.priority,
            self.rank_k,
            self.priority_temperature,
            generator or random.Random(),
            demoted,
            self.rank_power,
        )


# ------------------------------------------------------------------------------------- memory backend


class MemoryReplayBuffer(_Settings):
    def __init__(self, *settings, **options) -> None:  # _Settings' arguments
        super().__init__(*settings, **options)
        self.entries: dict[str, dict[str, _Entry]] = {}  # condition -> item id -> entry
        self.response_counts: dict[str, dict[str, int]] = {}  # condition -> response window -> items seen with it
        self.next_seq: dict[str, int] = {}
        self.gram_index: dict[str, dict[tuple, set[str]]] = {}  # condition -> _gram_index, kept up to date
        self.lock = threading.Lock()  # so threads sharing one buffer see the same rules as Redis writers

    def add(self, items: list[ReplayItem], condition: str = "", log_reward: LogRewardFormula = sum_of_terms) -> int:
        items, new_scores = _checked_add_args(items, condition, log_reward)
        if not items:
            return 0
        with self.lock:
            if self.novelty_after:
                counts = self.response_counts.setdefault(condition, {})
                for key, added in self._increments(items, counts).items():
                    counts[key] = counts.get(key, 0) + added
            entries = self.entries.setdefault(condition, {})
            index = self.gram_index.setdefault(condition, {}) if self.near_duplicate_threshold <= 1 else None
            admitted, self.next_seq[condition] = _admit(
                entries,
                index,
                items,
                new_scores,
                self.next_seq.get(condition, 0),
                log_reward,
                self.capacity,
                self.near_duplicate_threshold,
            )
            return admitted

    def sample(
        self,
        n: int,
        condition: str = "",
        log_reward: LogRewardFormula = sum_of_terms,
        reward_temperature: float = 1.0,
        generator: random.Random | None = None,
    ) -> list[ReplayItem]:
        _check_sample_args(n, condition, log_reward, reward_temperature)
        with self.lock:
            entries = list(self.entries.get(condition, {}).values())
            demoted = self._demoted(self._novelty_keys(entries), self.response_counts.get(condition, {}))
        drawn = self._draw(entries, n, log_reward, reward_temperature, generator, demoted)
        # Callers may mutate what they get, so hand out copies (one per distinct item, like the Redis backend).
        copies: dict[int, ReplayItem] = {}
        for e in drawn:
            if id(e) not in copies:
                copies[id(e)] = copy.deepcopy(e.item)
        return [copies[id(e)] for e in drawn]

    def __len__(self) -> int:
        with self.lock:
            return sum(len(entries) for entries in self.entries.values())

    def size(self, condition: str = "") -> int:
        with self.lock:
            return len(self.entries.get(_check_condition(condition), {}))

    def conditions(self) -> list[str]:
        with self.lock:
            return sorted(self.entries)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.next_seq.clear()
            self.gram_index.clear()
            self.response_counts.clear()

    def state_dict(self) -> dict:
        """The whole contents (plain lists and dicts, so a weights_only checkpoint can hold them)."""
        with self.lock:
            return {
                "backend": "memory",
                "next_seq": dict(self.next_seq),
                "response_counts": {condition: dict(counts) for condition, counts in self.response_counts.items()},
                "entries": {
                    condition: [
                        [
                            item_id,
                            e.seq,
                            e.item.token_ids,
                            e.item.text,
                            json.dumps(e.item.terms),
                            json.dumps(e.item.extra),
                        ]
                        for item_id, e in entries.items()
                    ]
                    for condition, entries in self.entries.items()
                },
            }

    def load_state_dict(self, state: dict) -> None:
        with self.lock:
            self.entries = {
                condition: {row[0]: _Entry(_item_from_state_row(row), row[1]) for row in rows}
                for condition, rows in state["entries"].items()
            }
            self.next_seq = dict(state["next_seq"])
            # checkpoints from before novelty counts: start counting afresh
            self.response_counts = {c: dict(counts) for c, counts in state.get("response_counts", {}).items()}
            self.gram_index = (
                {condition: _gram_index(entries) for condition, entries in self.entries.items()}
                if self.near_duplicate_threshold <= 1
                else {}
            )


def _item_from_state_row(row: list) -> ReplayItem:
    """[id, seq, token_ids, text, terms JSON, extra JSON]; format-2 checkpoints wrote log_prior, log_likelihood."""
    if len(row) == 7:
        _, _, token_ids, text, log_prior, log_likelihood, extra = row
        return ReplayItem(
            list(token_ids), text, {"log_prior": log_prior, "log_likelihood": log_likelihood}, json.loads(extra)
        )
    _, _, token_ids, text, terms, extra = row
    return ReplayItem(list(token_ids), text, json.loads(terms), json.loads(extra))


# ------------------------------------------------------------------------------------- redis backend


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparseable redis url>"


class RedisReplayBuffer(_Settings):
    def __init__(self, redis_url: str, namespace: str, *settings, **options) -> None:  # then _Settings' arguments
        super().__init__(*settings, **options)
        self.url, self.namespace = redact_url(redis_url), namespace
        self.conditions_key = f"{namespace}:conditions"
        try:
            self.client = redis.Redis.from_url(
                redis_url, decode_responses=True, socket_connect_timeout=5, socket_timeout=60
            )
        except ValueError as e:
            raise ValueError(f"invalid redis_url {self.url!r}: {e}") from None
        with self._reachable():
            self.client.ping()

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise ReplayBufferConnectionError(f"cannot reach Redis at {self.url}: {e}") from None

    def _key(self, condition: str, what: str) -> str:
        return f"{self.namespace}:{condition}:{what}"

    @staticmethod
    def _decode(raw: dict[str, str]) -> dict[str, _Entry]:
        entries = {}
        for item_id, value in raw.items():
            d = json.loads(value)
            entries[item_id] = _Entry(_item_from_json(d), d["seq"])
        return entries

    def add(self, items: list[ReplayItem], condition: str = "", log_reward: LogRewardFormula = sum_of_terms) -> int:
        items, new_scores = _checked_add_args(items, condition, log_reward)
        if not items:
            return 0
        items_key, seq_key = self._key(condition, "items"), self._key(condition, "next_seq")

        def transaction(pipe: redis.client.Pipeline) -> int:
            # Runs after WATCH(items_key, seq_key): reads are immediate, the writes queued after multi() are applied
            # by EXEC only if no other client changed either key since the WATCH; otherwise redis-py raises
            # WatchError inside `transaction` and calls this again on fresh data (every conflict means some
            # writer committed, so the writers as a whole always make progress).
            entries = self._decode(pipe.hgetall(items_key))
            before = {i: e.seq for i, e in entries.items()}
            index = _gram_index(entries) if self.near_duplicate_threshold <= 1 else None
            admitted, next_seq = _admit(
                entries,
                index,
                items,
                new_scores,
                int(pipe.get(seq_key) or 0),
                log_reward,
                self.capacity,
                self.near_duplicate_threshold,
            )
            removed = [i for i in before if i not in entries]
            written = {
                i: json.dumps(
                    {
                        "token_ids": e.item.token_ids,
                        "text": e.item.text,
                        "terms": e.item.terms,
                        "extra": e.item.extra,
                        "seq": e.seq,
                    }
                )
                for i, e in entries.items()
                if before.get(i) != e.seq
            }
            pipe.multi()
            if removed:
                pipe.hdel(items_key, *removed)
            if written:
                pipe.hset(items_key, mapping=written)
                pipe.sadd(self.conditions_key, condition)
            if admitted:
                pipe.set(seq_key, next_seq)
            return admitted

        with self._reachable():
            if self.novelty_after:  # increments commute: no transaction needed across writers
                responses_key = self._key(condition, "responses")
                # whether a response repeats is read before the increments: two writers adding the same new
                # response at once may both count it new (prefix counts only; the window counts stay exact)
                wanted = (
                    sorted({w for item in items for w in response_windows(item)}) if self.stale_prefix_after else []
                )
                found = self.client.hmget(responses_key, wanted) if wanted else []
                counts = {w: int(c) for w, c in zip(wanted, found) if c is not None}
                with self.client.pipeline(transaction=False) as pipe:
                    for key, added in self._increments(items, counts).items():
                        pipe.hincrby(responses_key, key, added)
                    pipe.execute()
            return self.client.transaction(transaction, items_key, seq_key, value_from_callable=True)

    def sample(
        self,
        n: int,
        condition: str = "",
        log_reward: LogRewardFormula = sum_of_terms,
        reward_temperature: float = 1.0,
        generator: random.Random | None = None,
    ) -> list[ReplayItem]:
        _check_sample_args(n, condition, log_reward, reward_temperature)
        if n == 0:
            return []
        with self._reachable():
            entries = list(self._decode(self.client.hgetall(self._key(condition, "items"))).values())
            keys = self._novelty_keys(entries)
            wanted = sorted({w for windows, prefix in keys for w in windows + ([prefix] if prefix else [])})
            found = self.client.hmget(self._key(condition, "responses"), wanted) if wanted else []
        counts = {w: int(c) for w, c in zip(wanted, found) if c is not None}
        demoted = self._demoted(keys, counts)
        drawn = self._draw(entries, n, log_reward, reward_temperature, generator, demoted)
        return [e.item for e in drawn]

    def __len__(self) -> int:
        with self._reachable():
            conditions = self.conditions()
            with self.client.pipeline(transaction=False) as pipe:
                for condition in conditions:
                    pipe.hlen(self._key(condition, "items"))
                return sum(pipe.execute())

    def size(self, condition: str = "") -> int:
        with self._reachable():
            return self.client.hlen(self._key(_check_condition(condition), "items"))

    def conditions(self) -> list[str]:
        with self._reachable():
            return sorted(self.client.smembers(self.conditions_key))

    def state_dict(self) -> dict:
        """The contents live in Redis under the namespace: a checkpoint holds the key prefix."""
        return {"backend": "redis", "namespace": self.namespace}

    def load_state_dict(self, state: dict) -> None:
        if state.get("namespace") != self.namespace:
            raise ValueError(
                f"checkpoint's replay buffer is under namespace {state.get('namespace')!r}, not {self.namespace!r}"
            )

    def clear(self) -> None:
        # Escape glob characters so the pattern matches exactly the keys "namespace:...".
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.namespace) + ":*"
        with self._reachable():
            batch = []
            for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) == 1000:
                    self.client.unlink(*batch)
                    batch = []
            if batch:
                self.client.unlink(*batch)


# ------------------------------------------------------------------------------------- factory


def make_replay_buffer(
    backend: str,
    capacity: int,
    *,
    priority: str = "rank",
    rank_k: float = DEFAULT_RANK_K,
    priority_temperature: float = 1.0,
    near_duplicate_threshold: float = 0.8,
    redis_url: str | None = None,
    namespace: str = "gfn-replay",
    novelty_after: int = 0,
    rank_power: float = 1.0,
    stale_prefix_after: int = 0,
    prefix_back: int = 2,
) -> ReplayBuffer:
    """A replay buffer with the rules of the module docstring. backend: "memory" or "redis" (needs redis_url;
    several processes with the same redis_url and namespace share one buffer)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown replay buffer backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"replay buffer capacity must be an int >= 1, got {capacity!r}")
    if priority not in PRIORITIES:
        raise ValueError(f"unknown replay priority {priority!r}: expected one of {', '.join(PRIORITIES)}")
    rank_k = _positive("rank_k", rank_k)
    rank_power = _positive("rank_power", rank_power)
    priority_temperature = _positive("priority_temperature", priority_temperature)
    if (
        isinstance(near_duplicate_threshold, bool)
        or not isinstance(near_duplicate_threshold, (int, float))
        or math.isnan(near_duplicate_threshold)
        or near_duplicate_threshold <= 0
    ):
        raise ValueError(f"near_duplicate_threshold must be > 0 (> 1 disables it), got {near_duplicate_threshold!r}")
    if isinstance(novelty_after, bool) or not isinstance(novelty_after, int) or novelty_after < 0:
        raise ValueError(f"novelty_after must be an int >= 0 (0 = off), got {novelty_after!r}")
    if novelty_after and priority != "rank":
        raise ValueError(f"novelty_after ranks often-seen responses last: it needs priority 'rank', not {priority!r}")
    for name, value, least in (("stale_prefix_after", stale_prefix_after, 0), ("prefix_back", prefix_back, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if stale_prefix_after and not novelty_after:
        raise ValueError("stale_prefix_after demotes with the novelty counts: it needs novelty_after > 0")
    settings = (capacity, priority, rank_k, priority_temperature, float(near_duplicate_threshold))
    ranking = {
        "novelty_after": novelty_after,
        "rank_power": rank_power,
        "stale_prefix_after": stale_prefix_after,
        "prefix_back": prefix_back,
    }
    if backend == "memory":
        return MemoryReplayBuffer(*settings, **ranking)
    if not redis_url or not isinstance(redis_url, str):
        raise ValueError("the redis replay buffer needs redis_url, e.g. redis://localhost:6379/0")
    if not isinstance(namespace, str) or not namespace or ":" in namespace:
        raise ValueError(f"namespace must be a non-empty string without ':', got {namespace!r}")
    return RedisReplayBuffer(redis_url, namespace, *settings, **ranking)
