"""The replay buffer's rules (see replay_buffer.py), one suite run against both backends. The Redis backend runs
against a real redis-server (the `redis_url` fixture in conftest.py), each test in its own namespace."""

from __future__ import annotations

import math
import random
import re
import socket
import threading
import uuid
from collections import Counter

import pytest
import redis

from replay_buffer import (
    MemoryReplayBuffer,
    ReplayBufferConnectionError,
    ReplayItem,
    jaccard,
    make_replay_buffer,
    novelty_increments,
    prefix_key,
    response_windows,
    sum_of_terms,
    token_grams,
    weighted,
)


def item(
    token_ids: list[int],
    log_prior: float,
    log_likelihood: float = 0.0,
    text: str | None = None,
    extra: dict | None = None,
) -> ReplayItem:
    return ReplayItem(
        list(token_ids),
        text if text is not None else " ".join(map(str, token_ids)),
        {"log_prior": log_prior, "log_likelihood": log_likelihood},
        extra if extra is not None else {},
    )


def distinct(i: int, length: int = 4) -> list[int]:
    """Token ids sharing no bigram with distinct(j) for j != i."""
    return [1000 * i + t for t in range(length)]


def fresh_namespace() -> str:
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture(params=["memory", "redis"])
def make(request):
    """make(capacity, **options) -> a buffer of the parametrised backend (Redis: a fresh namespace each call)."""
    made = []

    def factory(capacity: int = 10, **options):
        if request.param == "redis":
            options.setdefault("redis_url", request.getfixturevalue("redis_url"))
            options.setdefault("namespace", fresh_namespace())
        buffer = make_replay_buffer(request.param, capacity, **options)
        made.append(buffer)
        return buffer

    yield factory
    for buffer in made:
        buffer.clear()


def contents(buffer, condition: str = "", **weights) -> dict[str, tuple[float, float]]:
    """text -> (log_prior, log_likelihood) of everything stored: uniform-enough draws catch every item of a
    small condition (the rarest of 10 rank-sampled items has p > 0.03; 3000 draws miss it with p < 1e-40)."""
    drawn = buffer.sample(3000, condition, generator=random.Random(0), **weights)
    found = {x.text: (x.terms["log_prior"], x.terms["log_likelihood"]) for x in drawn}
    assert len(found) == buffer.size(condition)
    return found


def frequencies(buffer, n: int, seed: int = 0, condition: str = "", **kwargs) -> Counter:
    return Counter(x.text for x in buffer.sample(n, condition, generator=random.Random(seed), **kwargs))


def chi_square(counts: Counter, expected: dict[str, float], n: int) -> float:
    return sum((counts[k] - n * p) ** 2 / (n * p) for k, p in expected.items())


# 99.9% quantiles of chi-square: a correct sampler fails these with probability 1e-3 (and never, at a fixed seed).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


# ------------------------------------------------------------------------------------------ storing


def test_reward_formulas_over_named_terms() -> None:
    x = item([1, 2], log_prior=-2.0, log_likelihood=-3.0)
    assert sum_of_terms([x.terms]) == [-5.0]
    assert weighted(log_prior=0.5, log_likelihood=2.0)([x.terms, x.terms]) == [-7.0, -7.0]
    assert weighted(log_prior=1.0)([x.terms]) == [-2.0]  # an unweighted term does not count


def test_any_task_formula_ranks_items_by_their_stored_terms(make) -> None:
    """A gated, non-linear formula (like the contradiction task's penalised phase) over terms the buffer knows
    nothing about: the buffer stores the terms and applies whichever formula it is given."""
    buffer = make(2)

    def gate(threshold: float):
        return lambda rows: [t["log_question"] if t["log_contradiction"] >= threshold else -100.0 for t in rows]

    rows = [
        ReplayItem([1], "fluent, agrees", {"log_question": -1.0, "log_contradiction": -5.0}),
        ReplayItem([2], "clumsy, contradicts", {"log_question": -9.0, "log_contradiction": -0.1}),
        ReplayItem([3], "middling, contradicts", {"log_question": -5.0, "log_contradiction": -0.2}),
    ]
    buffer.add(rows, log_reward=gate(-1.0))  # the agreeing question fails the gate and is evicted
    assert {x.text for x in buffer.sample(500, generator=random.Random(0))} == {
        "clumsy, contradicts",
        "middling, contradicts",
    }
    drawn = buffer.sample(2000, log_reward=gate(-1.0), generator=random.Random(0))
    assert Counter(x.text for x in drawn).most_common(1)[0][0] == "middling, contradicts"
    [stored] = [x for x in drawn if x.text == "clumsy, contradicts"][:1]
    assert stored.terms == {"log_question": -9.0, "log_contradiction": -0.1}
    with pytest.raises(ValueError, match="needs the term 'log_prior'"):
        buffer.sample(1, log_reward=weighted(log_prior=1.0))  # the stored items have no log_prior
    with pytest.raises(ValueError, match="finite log reward per item"):
        buffer.add([ReplayItem([5], "x", {"a": 1.0})], log_reward=lambda rows: [float("nan")] * len(rows))
    with pytest.raises(ValueError, match="terms must be a non-empty dict"):
        buffer.add([ReplayItem([6], "x", {})])


def test_capacity_evicts_the_minimum(make) -> None:
    buffer = make(3)
    assert buffer.add([item(distinct(i), float(i), text=f"r{i}") for i in (1, 2, 3)]) == 3
    assert len(buffer) == 3
    assert buffer.add([item(distinct(9), 0.5, text="low")]) == 0  # below the minimum: not stored
    assert set(contents(buffer)) == {"r1", "r2", "r3"}
    assert buffer.add([item(distinct(8), 2.5, text="mid")]) == 1  # evicts r1, the minimum
    assert set(contents(buffer)) == {"mid", "r2", "r3"}
    assert buffer.add([item(distinct(7), 2.0, text="tie")]) == 0  # equal to the minimum is not higher
    assert buffer.size() == 3 and len(buffer) == 3


def test_each_add_computes_the_formula_once_per_item(make) -> None:
    """One add: the new items' log rewards once (checked before anything is stored, then used to admit them) and
    the stored items' once (recomputed with this add's formula)."""
    buffer = make(10)
    seen: list[str] = []

    def counting(rows):
        seen.extend(f"{row['log_prior']:g}" for row in rows)
        return [row["log_prior"] for row in rows]

    buffer.add([item(distinct(i), float(i)) for i in (1, 2, 3)], log_reward=counting)
    assert sorted(seen) == ["1", "2", "3"]
    seen.clear()
    buffer.add([item(distinct(i), float(i)) for i in (4, 5)], log_reward=counting)
    assert sorted(seen) == ["1", "2", "3", "4", "5"]


def test_eviction_uses_the_weights_given_to_add(make) -> None:
    for weights, survivor in (((1.0, 0.0), "llm-heavy"), ((0.0, 1.0), "prior-heavy")):
        buffer = make(2)
        buffer.add([item(distinct(0), 5.0, 0.0, text="prior-heavy"), item(distinct(1), 0.0, 5.0, text="llm-heavy")])
        # Worth 1 under either weighting: it evicts whichever stored item is worth 0 under this add's weights.
        new = item(distinct(2), 1.0, 1.0, text="new")
        assert buffer.add([new], log_reward=weighted(log_prior=weights[0], log_likelihood=weights[1])) == 1
        assert set(contents(buffer)) == {"new", {"llm-heavy": "prior-heavy", "prior-heavy": "llm-heavy"}[survivor]}


def test_equal_minima_evict_the_latest_inserted(make) -> None:
    buffer = make(3, priority="uniform")
    buffer.add(
        [
            item(distinct(0), 1.0, text="first"),
            item(distinct(1), 1.0, text="second"),
            item(distinct(2), 5.0, text="best"),
        ]
    )
    buffer.add([item(distinct(3), 2.0, text="new")])
    assert set(contents(buffer)) == {"first", "best", "new"}


def test_exact_duplicate_replaced_only_when_higher(make) -> None:
    buffer = make(5)
    assert buffer.add([item([1, 2, 3], -2.0, -1.0, text="x", extra={"y": "first"})]) == 1
    assert buffer.add([item([1, 2, 3], -2.0, -2.0, text="x", extra={"y": "worse"})]) == 0
    assert buffer.add([item([1, 2, 3], -1.0, -2.0, text="x", extra={"y": "equal"})]) == 0  # equal is not higher
    [stored] = buffer.sample(1, generator=random.Random(0))
    assert stored.extra == {"y": "first"} and buffer.size() == 1
    assert buffer.add([item([1, 2, 3], -2.0, -0.5, text="x", extra={"y": "better"})]) == 1
    [stored] = buffer.sample(1, generator=random.Random(0))
    assert (stored.terms["log_prior"], stored.terms["log_likelihood"], stored.extra) == (-2.0, -0.5, {"y": "better"})
    assert buffer.size() == 1
    # Within one batch too: only the best copy is kept.
    assert buffer.add([item([7], 1.0, text="a"), item([7], 3.0, text="b"), item([7], 2.0, text="c")]) == 2
    assert buffer.size() == 2 and "b" in contents(buffer)


def test_near_duplicate_replaced_only_when_higher_and_unrelated_items_kept(make) -> None:
    buffer = make(5, near_duplicate_threshold=0.5)
    stored = item([1, 2, 3, 4, 5, 6], 1.0, text="stored")
    unrelated = item([50, 51, 52, 53], 0.1, text="unrelated")
    buffer.add([stored, unrelated])
    near = [1, 2, 3, 4, 5, 7]  # bigrams: 4 shared of 6 in the union, Jaccard 0.67
    assert buffer.add([item(near, 0.5, text="near-worse")]) == 0
    assert set(contents(buffer)) == {"stored", "unrelated"}
    assert buffer.add([item(near, 2.0, text="near-better")]) == 1
    assert contents(buffer) == {"near-better": (2.0, 0.0), "unrelated": (0.1, 0.0)}


def test_near_duplicate_threshold_and_disabling(make) -> None:
    near_pair = [item([1, 2, 3, 4, 5, 6], 1.0, text="a"), item([1, 2, 3, 4, 5, 7], 2.0, text="b")]
    default = make(5)  # 0.8: Jaccard 0.67 is not a near duplicate
    assert default.add(near_pair) == 2 and default.size() == 2
    disabled = make(5, near_duplicate_threshold=1.5)
    assert disabled.add([item([1, 2, 3], 1.0, text="a"), item([1, 2, 3, 9], 2.0, text="b")]) == 2
    strict = make(5, near_duplicate_threshold=0.5)
    # Sequences shorter than 2 tokens compare unigrams: [5] vs [5] is identical, [5] vs [5, 6] shares nothing.
    assert strict.add([item([5], 1.0, text="u"), item([5, 6], 1.0, text="v")]) == 2


def test_near_duplicate_of_several_compares_with_best_and_removes_all(make) -> None:
    buffer = make(5, near_duplicate_threshold=0.5)
    a, b = [1, 2, 3, 4, 5], [4, 5, 6, 7, 8]  # Jaccard(a, b) = 1/7: both are kept
    long = [1, 2, 3, 4, 5, 6, 7, 8]  # Jaccard 4/7 with each of a and b
    buffer.add([item(a, 1.0, text="a"), item(b, 3.0, text="b"), item(distinct(9), 0.0, text="unrelated")])
    assert buffer.size() == 3
    assert buffer.add([item(long, 2.0, text="long")]) == 0  # beats a but not b, the best of them
    assert set(contents(buffer)) == {"a", "b", "unrelated"}
    assert buffer.add([item(long, 4.0, text="long")]) == 1
    assert set(contents(buffer)) == {"long", "unrelated"}


def reference_contents(offers: list[ReplayItem], capacity: int, threshold: float) -> set[tuple]:
    """Rules 1-3 written the slow, obvious way: a list scanned in full for every offer."""
    stored: list[tuple[ReplayItem, int]] = []  # (item, insertion number)
    for seq, x in enumerate(offers):
        score = sum(x.terms.values())
        rivals = [
            (y, s)
            for y, s in stored
            if y.token_ids == x.token_ids
            or (threshold <= 1 and jaccard(token_grams(x.token_ids), token_grams(y.token_ids)) >= threshold)
        ]
        if rivals:
            if score <= max(sum(y.terms.values()) for y, _ in rivals):
                continue
            stored = [entry for entry in stored if entry not in rivals]
        elif len(stored) >= capacity:
            worst = min(stored, key=lambda entry: (sum(entry[0].terms.values()), -entry[1]))
            if score <= sum(worst[0].terms.values()):
                continue
            stored.remove(worst)
        stored.append((x, seq))
    return {(tuple(y.token_ids), y.terms["log_prior"]) for y, _ in stored}


@pytest.mark.parametrize("threshold", [0.3, 0.6, 1.0, 2.0])
def test_rules_match_a_brute_force_reference(make, threshold: float) -> None:
    rng = random.Random(int(threshold * 10))
    offers = [
        item([rng.randint(0, 5) for _ in range(rng.randint(0, 6))], float(rng.randint(-20, 20))) for _ in range(150)
    ]  # a small vocabulary: many exact and near duplicates, and tied rewards
    buffer = make(8, priority="uniform", near_duplicate_threshold=threshold)
    for start in range(0, len(offers), 5):
        buffer.add(offers[start : start + 5])
    drawn = buffer.sample(3000, generator=random.Random(0))
    assert {(tuple(x.token_ids), x.terms["log_prior"]) for x in drawn} == reference_contents(offers, 8, threshold)
    assert buffer.size() == len(reference_contents(offers, 8, threshold))


def test_conditions_are_separate_heaps(make) -> None:
    buffer = make(2)
    buffer.add([item(distinct(0), 1.0, text="a0"), item(distinct(1), 2.0, text="a1")], condition="a")
    buffer.add(
        [item(distinct(0), 5.0, text="b0"), item(distinct(1), 6.0, text="b1"), item(distinct(2), 7.0, text="b2")],
        condition="b",
    )  # same token ids: not duplicates across conditions
    assert buffer.size("a") == 2 and buffer.size("b") == 2 and buffer.size("c") == 0 and buffer.size() == 0
    assert len(buffer) == 4
    assert buffer.conditions() == ["a", "b"]
    assert set(contents(buffer, "a")) == {"a0", "a1"}
    assert set(contents(buffer, "b")) == {"b1", "b2"}
    assert buffer.sample(5, "c", generator=random.Random(0)) == []
    buffer.clear()
    assert len(buffer) == 0 and buffer.conditions() == [] and buffer.sample(3, "a") == []


def test_extras_round_trip_and_returned_items_are_copies(make) -> None:
    buffer = make(3)
    extra = {"response": "y text", "tokens": [1, 2], "nested": {"ok": True, "p": 0.25}}
    buffer.add([item([4, 5, 6], -1.5, -2.25, text="x", extra=extra)])
    [got] = buffer.sample(1)
    assert got == ReplayItem([4, 5, 6], "x", {"log_prior": -1.5, "log_likelihood": -2.25}, extra)
    got.extra["response"] = "mutated"
    got.token_ids.append(99)
    [again] = buffer.sample(1)
    assert again.extra == extra and again.token_ids == [4, 5, 6]


# ------------------------------------------------------------------------------------------ sampling


def test_rank_sampling_frequencies(make) -> None:
    buffer = make(10, rank_k=1.0)
    rewards = [-1.0, -30.0, 4.0, -2.5, 100.0]  # inserted out of order; scale must not matter
    buffer.add([item(distinct(i), r, text=f"r{r}") for i, r in enumerate(rewards)])
    ranked = sorted(rewards, reverse=True)
    norm = sum(1.0 / (1.0 + rank) for rank in range(len(ranked)))
    expected = {f"r{r}": (1.0 / (1.0 + rank)) / norm for rank, r in enumerate(ranked)}
    n = 20_000
    counts = frequencies(buffer, n, seed=1)
    assert chi_square(counts, expected, n) < CHI2_999[4]
    assert counts["r100.0"] / n < 0.5  # the best of 5 gets 1/H_5 = 0.44, however far ahead its reward is


def test_rank_k_flattens_rank_sampling(make) -> None:
    buffer = make(10, rank_k=10.0)
    buffer.add([item(distinct(i), float(i), text=f"r{i}") for i in range(3)])
    norm = 1 / 10 + 1 / 11 + 1 / 12
    expected = {"r2": (1 / 10) / norm, "r1": (1 / 11) / norm, "r0": (1 / 12) / norm}
    n = 20_000
    assert chi_square(frequencies(buffer, n), expected, n) < CHI2_999[2]


def test_rank_ties_go_to_the_earliest_inserted(make) -> None:
    buffer = make(10)
    buffer.add([item(distinct(0), 1.0, text="early")])
    buffer.add([item(distinct(1), 1.0, text="late")])
    n = 20_000
    assert chi_square(frequencies(buffer, n), {"early": 2 / 3, "late": 1 / 3}, n) < CHI2_999[1]


def test_tempered_sampling_frequencies(make) -> None:
    buffer = make(10, priority="tempered", priority_temperature=2.0)
    rewards = [0.0, -1.0, -2.0, -4.0]
    buffer.add([item(distinct(i), r, text=f"r{r}") for i, r in enumerate(rewards)])
    for reward_temperature in (1.0, 0.5):
        weights = {f"r{r}": math.exp(r / (reward_temperature * 2.0)) for r in rewards}
        expected = {k: w / sum(weights.values()) for k, w in weights.items()}
        n = 20_000
        counts = frequencies(buffer, n, reward_temperature=reward_temperature)
        assert chi_square(counts, expected, n) < CHI2_999[3]


def test_uniform_sampling_frequencies(make) -> None:
    buffer = make(10, priority="uniform")
    buffer.add([item(distinct(i), float(10 * i), text=f"r{i}") for i in range(4)])
    n = 20_000
    assert chi_square(frequencies(buffer, n), {f"r{i}": 0.25 for i in range(4)}, n) < CHI2_999[3]


def test_sampling_retempers_stored_components(make) -> None:
    rank = make(10)
    tempered = make(10, priority="tempered")
    for buffer in (rank, tempered):
        buffer.add([item(distinct(0), 0.0, -3.0, text="likely-x"), item(distinct(1), -3.0, 0.0, text="likely-y")])
    n = 10_000
    # Changing the weights at sample time swaps the ranking (rank: 2/3 of the draws go to the top).
    assert (
        frequencies(rank, n, log_reward=weighted(log_prior=1.0, log_likelihood=0.0)).most_common(1)[0][0] == "likely-x"
    )
    assert (
        frequencies(rank, n, log_reward=weighted(log_prior=0.0, log_likelihood=1.0)).most_common(1)[0][0] == "likely-y"
    )
    assert frequencies(rank, n, log_reward=weighted(log_prior=0.0, log_likelihood=1.0))[
        "likely-y"
    ] / n == pytest.approx(2 / 3, abs=0.02)
    # Tempered: the top share is sigmoid(3 / T) under weights (1, 0), and it falls towards 1/2 as T grows.
    for reward_temperature in (1.0, 3.0, 100.0):
        share = (
            frequencies(
                tempered,
                n,
                log_reward=weighted(log_prior=1.0, log_likelihood=0.0),
                reward_temperature=reward_temperature,
            )["likely-x"]
            / n
        )
        assert share == pytest.approx(1 / (1 + math.exp(-3.0 / reward_temperature)), abs=0.02)
    assert frequencies(tempered, n, log_reward=weighted(log_prior=0.0, log_likelihood=1.0))["likely-y"] / n > 0.9


def test_sampling_is_deterministic_given_the_generator(make) -> None:
    buffer = make(10)
    buffer.add([item(distinct(i), float(i)) for i in range(6)])
    first = buffer.sample(50, generator=random.Random(7))
    assert first == buffer.sample(50, generator=random.Random(7))
    assert first != buffer.sample(50, generator=random.Random(8))
    assert buffer.sample(0) == []


# ------------------------------------------------------------------------------------------ arguments


def test_bad_arguments_raise_clear_value_errors(make) -> None:
    for kwargs, message in (
        ({"capacity": 0}, "capacity must be an int >= 1"),
        ({"capacity": 2.5}, "capacity must be an int >= 1"),
        ({"priority": "greedy"}, "unknown replay priority 'greedy'"),
        ({"rank_k": 0.0}, "rank_k must be > 0"),
        ({"priority_temperature": -1.0}, "priority_temperature must be > 0"),
        ({"near_duplicate_threshold": 0.0}, "near_duplicate_threshold must be > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            make(**kwargs)
    with pytest.raises(ValueError, match="unknown replay buffer backend 'disk'"):
        make_replay_buffer("disk", 10)
    buffer = make(5)
    for bad, message in (
        (item([1, 2], float("nan")), "log_prior must be a finite number"),
        (item([1, 2], 0.0, float("-inf")), "log_likelihood must be a finite number"),
        (item([1, 2], 0.0, extra={"obj": object()}), "extra must be a JSON-serialisable dict"),
        (item([1, "2"], 0.0), "token_ids must be a list of ints"),
    ):
        with pytest.raises(ValueError, match=message):
            buffer.add([bad])
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        buffer.sample(-1)
    with pytest.raises(ValueError, match="reward_temperature must be > 0"):
        buffer.sample(3, reward_temperature=0.0)
    with pytest.raises(ValueError, match="condition must be a string"):
        buffer.add([item([1], 0.0)], condition=3)
    assert len(buffer) == 0  # nothing half-added


def test_redis_specific_arguments() -> None:
    with pytest.raises(ValueError, match="needs redis_url"):
        make_replay_buffer("redis", 10)
    with pytest.raises(ValueError, match="namespace must be a non-empty string without ':'"):
        make_replay_buffer("redis", 10, redis_url="redis://127.0.0.1:1/0", namespace="a:b")
    with pytest.raises(ValueError, match="invalid redis_url"):
        make_replay_buffer("redis", 10, redis_url="http://127.0.0.1:1/0")


def test_unreachable_redis_is_a_one_line_connection_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redacted = re.escape(f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0")
    with pytest.raises(ReplayBufferConnectionError, match=redacted) as e:
        make_replay_buffer("redis", 10, redis_url=f"redis://:hunter2@127.0.0.1:{port}/0")
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ConnectionError)


# ------------------------------------------------------------------------------------------ redis only


def test_backends_return_identical_samples(redis_url: str) -> None:
    sequence_rng = random.Random(3)
    batches = []
    for _ in range(30):  # duplicates, near duplicates, ties and evictions across two conditions
        batch = []
        for _ in range(sequence_rng.randint(1, 4)):
            ids = [sequence_rng.randint(0, 6) for _ in range(sequence_rng.randint(1, 5))]
            batch.append(
                item(
                    ids,
                    float(sequence_rng.randint(-3, 3)),
                    float(sequence_rng.randint(-3, 0)),
                    extra={"y": sequence_rng.random()},
                )
            )
        batches.append((batch, sequence_rng.choice(["", "s1"]), sequence_rng.choice([1.0, 0.5])))
    for priority in ("rank", "tempered", "uniform"):
        buffers = [
            make_replay_buffer(
                backend,
                6,
                priority=priority,
                near_duplicate_threshold=0.6,
                redis_url=redis_url,
                namespace=fresh_namespace(),
            )
            for backend in ("memory", "redis")
        ]
        try:
            for batch, condition, prior_weight in batches:
                added = [b.add(batch, condition, weighted(log_prior=prior_weight, log_likelihood=1.0)) for b in buffers]
                assert added[0] == added[1]
            assert buffers[0].conditions() == buffers[1].conditions() == ["", "s1"]
            for condition in ("", "s1"):
                assert buffers[0].size(condition) == buffers[1].size(condition)
                for seed in range(3):
                    kwargs = dict(
                        log_reward=weighted(log_prior=0.3 * seed, log_likelihood=1.0), reward_temperature=1.0 + seed
                    )
                    memory = buffers[0].sample(200, condition, generator=random.Random(seed), **kwargs)
                    remote = buffers[1].sample(200, condition, generator=random.Random(seed), **kwargs)
                    assert memory == remote and len(memory) == 200
        finally:
            for b in buffers:
                b.clear()


def test_concurrent_redis_writers_keep_capacity_and_best_copies(redis_url: str) -> None:
    capacity, namespace = 8, fresh_namespace()
    # 40 distinct sequences; each writer offers every one with its own reward, one item per add, in its own order.
    offers = {
        w: [item(distinct(i), random.Random(100 * w + i).uniform(-10, 10), text=f"s{i}") for i in range(40)]
        for w in range(2)
    }
    best = {f"s{i}": max(offers[0][i].terms["log_prior"], offers[1][i].terms["log_prior"]) for i in range(40)}
    top = dict(sorted(best.items(), key=lambda kv: -kv[1])[:capacity])  # the outcome of any serial order
    writers = [make_replay_buffer("redis", capacity, redis_url=redis_url, namespace=namespace) for _ in range(2)]
    start, errors = threading.Barrier(2), []

    def write(w: int) -> None:
        try:
            order = list(offers[w])
            random.Random(w).shuffle(order)
            start.wait()
            for _ in range(3):
                for x in order:
                    writers[w].add([x])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors
        assert writers[0].size() == capacity
        raw = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(f"{namespace}::items")
        assert len(raw) == capacity
        assert {x.text: x.terms["log_prior"] for x in writers[1].sample(2000, generator=random.Random(0))} == top
    finally:
        writers[0].clear()


def test_clear_deletes_only_its_namespace(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    mine, other = fresh_namespace(), fresh_namespace()
    a = make_replay_buffer("redis", 5, redis_url=redis_url, namespace=mine)
    b = make_replay_buffer("redis", 5, redis_url=redis_url, namespace=other)
    prefixed = make_replay_buffer("redis", 5, redis_url=redis_url, namespace=mine + "x")
    for buffer in (a, b, prefixed):
        buffer.add([item([1, 2], 0.0)], condition="c")
    client.set(f"unrelated-{mine}", "keep")
    assert set(client.keys(f"{mine}:*")) == {f"{mine}:conditions", f"{mine}:c:items", f"{mine}:c:next_seq"}
    a.clear()
    assert client.keys(f"{mine}:*") == [] and len(a) == 0
    assert len(b) == 1 and len(prefixed) == 1 and client.get(f"unrelated-{mine}") == "keep"
    b.clear(), prefixed.clear(), client.delete(f"unrelated-{mine}")


# ------------------------------------------------------------------------------------------ novelty

RECORD = "Key ledger, vault 3412: held by Ansel Quell of Brindlemoor, access code 1234."


def said(name: str, token_ids: list[int], log_prior: float, x: str, y: str | None) -> ReplayItem:
    """An item whose x text is `x` and whose oracle answer is `y`, drawn counts keyed by `name`."""
    return item(token_ids, log_prior, text=x, extra={"name": name} if y is None else {"name": name, "y": y})


def names(buffer, n: int, condition: str = "") -> Counter:
    return Counter(x.extra["name"] for x in buffer.sample(n, condition, generator=random.Random(0)))


def test_novelty_ranks_items_whose_text_was_seen_often_last(make) -> None:
    def filled(**options):
        buffer = make(10, **options)
        buffer.add(
            [
                # x ends inside the record and y goes on from there: the record is whole in x + y
                said(
                    "record",
                    distinct(0),
                    10.0,
                    "Key ledger, vault 34",
                    "12: held by Ansel Quell of Brindlemoor, access code 1234. Then the ledger closed.",
                ),  # fmt: skip
                said("new", distinct(1), 5.0, "Tell me", " an answer nobody wrote before, eight words or more"),
                said("short", distinct(2), 1.0, "Yes", "."),
            ]
        )
        # the same record again after another opening, case and spacing aside
        buffer.add([said("again", distinct(3), 0.0, "Found:", "  " + RECORD.upper())])
        return buffer

    n, norm = 20_000, 1 + 1 / 2 + 1 / 3 + 1 / 4
    # seen twice: with novelty_after=2 both record items go last (among themselves by reward), else reward order;
    # seen twice is below 3: nothing moves
    for options, order in (
        ({}, ["record", "new", "short", "again"]),
        ({"novelty_after": 2}, ["new", "short", "record", "again"]),
        ({"novelty_after": 3}, ["record", "new", "short", "again"]),
    ):
        expected = {name: (1 / (1 + rank)) / norm for rank, name in enumerate(order)}
        assert chi_square(names(filled(**options), n), expected, n) < CHI2_999[3]


def test_novelty_windows_run_over_x_and_its_answer_as_one_text() -> None:
    split = said("split", [1], 0.0, "Human resources file 20", "15: Kestrel Wexley of Kettlewick, salary band TA")
    whole = said("whole", [2], 0.0, "", "HUMAN  resources file 2015: Kestrel Wexley of Kettlewick, salary band TA")
    answer_only = said("answer", [3], 0.0, "", "15: Kestrel Wexley of Kettlewick, salary band TA")
    assert response_windows(split) == response_windows(whole)
    assert len(response_windows(split)) == 4 and not set(response_windows(split)) & set(response_windows(answer_only))


def test_novelty_counts_every_added_text_per_condition(make) -> None:
    buffer = make(10, novelty_after=2)
    buffer.add([said("paris", distinct(0), 9.0, "The capital is", " Paris")])
    buffer.add([said("lyon", distinct(1), 1.0, "The city is", " Lyon")])
    buffer.add([said("elsewhere", distinct(2), 5.0, "The capital is", " Paris")], condition="s1")
    assert set(names(buffer, 200)) == {"paris", "lyon"}
    assert names(buffer, 2000)["paris"] > 1200  # seen once in its condition: still first (2/3)
    # an exact duplicate with a lower reward is not stored, but its text was seen: the stored one goes last
    buffer.add([said("dropped", distinct(0), 2.0, "the capital is ", "paris ")])
    assert buffer.size() == 2
    counts = names(buffer, 2000)
    assert "dropped" not in counts and counts["paris"] < 800  # now second of two: 1/3
    # items without an answer (no "y") are never demoted
    plain = make(10, novelty_after=1)
    plain.add([said("best", distinct(0), 3.0, "same", None), said("next", distinct(1), 1.0, "same", None)])
    assert names(plain, 2000)["best"] > 1200


def test_novelty_counts_survive_a_checkpoint_and_are_shared_through_redis(redis_url: str) -> None:
    paris = [said("a", distinct(0), 5.0, "It is", " Paris"), said("b", distinct(1), 1.0, "no answer", None)]
    again = [said("c", distinct(2), 0.0, "It is", " Paris")]
    memory = make_replay_buffer("memory", 10, novelty_after=2)
    memory.add(paris)
    memory.add(again)
    restored = make_replay_buffer("memory", 10, novelty_after=2)
    restored.load_state_dict(memory.state_dict())
    assert names(restored, 500) == names(memory, 500)
    assert names(restored, 2000)["b"] > 900  # "a" was demoted before the save and still is: b gets 6/11
    namespace = fresh_namespace()
    writers = [make_replay_buffer("redis", 10, novelty_after=2, redis_url=redis_url, namespace=namespace) for _ in "ab"]
    try:
        writers[0].add(paris)
        assert names(writers[1], 2000)["a"] > 1200
        writers[1].add(again)  # the other writer saw it again
        assert names(writers[0], 2000)["b"] > 900  # 6/11 (second: 3/11)
    finally:
        writers[0].clear()


def test_novelty_arguments(make) -> None:
    with pytest.raises(ValueError, match="novelty_after must be an int >= 0"):
        make(novelty_after=-1)
    with pytest.raises(ValueError, match="needs priority 'rank', not 'tempered'"):
        make(novelty_after=2, priority="tempered")


# ------------------------------------------------------------------------------------------ stale prefixes


def test_novelty_increments_count_a_prefix_once_per_repeated_response() -> None:
    first = said("first", [1, 2, 3, 4], 0.0, "Lab sample 1", "2: " + RECORD)
    again = said("again", [1, 2, 5, 6], 0.0, "Lab sample 1", "3: " + RECORD)  # same prefix [1, 2], same record
    other = said("other", [7, 8, 9, 10], 0.0, "Tell me", " an answer nobody wrote before, eight words or more")
    short = said("short", [1, 2], 0.0, "Lab", " " + RECORD)  # nothing left once 2 tokens are dropped
    lab = prefix_key(first, 2)
    assert lab == prefix_key(again, 2) != prefix_key(other, 2) and prefix_key(short, 2) is None
    assert lab not in novelty_increments([first, other], {}, prefix_back=2)  # nothing repeated yet
    added = novelty_increments([first, again, other, short], {}, prefix_back=2)
    assert added[lab] == 1  # `again` repeats `first` within one add; `short` repeats too but has no prefix
    seen = novelty_increments([first], {}, prefix_back=None)  # the counts after `first` alone
    assert novelty_increments([first, again], seen, prefix_back=2)[lab] == 2  # both repeat what was counted
    assert set(novelty_increments([first, again], {}, prefix_back=None)) == set(response_windows(first)) | set(
        response_windows(again)
    )  # without prefix_back: windows only, each counted once per item
    assert novelty_increments([first, again], {}, prefix_back=None)[response_windows(first)[-1]] == 2


def test_stale_prefix_ranks_a_neighbourhood_that_keeps_repeating_last(make) -> None:
    # window demotion set high (10) so that only the prefix rule moves anything
    buffer = make(20, novelty_after=10, stale_prefix_after=2, prefix_back=2)
    lab = [1, 2]  # the prefix every "lab" item shares (what local search keeps of them)
    buffer.add(
        [
            said("lab", lab + [3, 4], 10.0, "Lab sample 1", "2: " + RECORD),
            said("other", [7, 8, 9, 10], 5.0, "Tell me", " an answer nobody wrote before, eight words or more"),
            said("short", [20, 21], 1.0, "Lab", " sample 15: a record that is not the other one at all"),
        ]
    )
    assert names(buffer, 2000).most_common(1)[0][0] == "lab"
    # one ending repeating the record: the prefix has one repeat (below 2); a new answer under it adds none
    buffer.add([said("lab-again", lab + [5, 6], 9.0, "Lab sample 1", "3: " + RECORD)])
    buffer.add(
        [said("lab-new", lab + [11, 12], 8.0, "Lab sample 1", "4: a different record, never written before now")]
    )
    assert names(buffer, 2000).most_common(1)[0][0] == "lab"
    # a second repeat: every item under the prefix goes last, "other" and "short" (no prefix) first
    buffer.add([said("lab-third", lab + [13, 14], 7.0, "Lab sample 1", "5: " + RECORD)])
    order = ["other", "short", "lab", "lab-again", "lab-new", "lab-third"]
    expected = {name: (1 / (1 + rank)) / sum(1 / (1 + r) for r in range(6)) for rank, name in enumerate(order)}
    assert chi_square(names(buffer, 20_000), expected, 20_000) < CHI2_999[5]
    # repeats under another prefix do not touch it; a restored memory buffer keeps the counts
    if isinstance(buffer, MemoryReplayBuffer):
        restored = make_replay_buffer("memory", 20, novelty_after=10, stale_prefix_after=2, prefix_back=2)
        restored.load_state_dict(buffer.state_dict())
        assert names(restored, 500) == names(buffer, 500)


def test_stale_prefix_arguments(make) -> None:
    with pytest.raises(ValueError, match="stale_prefix_after demotes with the novelty counts"):
        make(stale_prefix_after=2)
    with pytest.raises(ValueError, match="stale_prefix_after must be an int >= 0"):
        make(novelty_after=2, stale_prefix_after=-1)
    with pytest.raises(ValueError, match="prefix_back must be an int >= 1"):
        make(novelty_after=2, stale_prefix_after=2, prefix_back=0)


def test_rank_power_concentrates_rank_sampling(make) -> None:
    buffer = make(10, rank_power=2.0)
    buffer.add([item(distinct(i), float(i), text=f"r{i}") for i in range(4)])
    norm = sum((1 + rank) ** -2.0 for rank in range(4))
    expected = {f"r{3 - rank}": (1 + rank) ** -2.0 / norm for rank in range(4)}
    n = 20_000
    counts = frequencies(buffer, n)
    assert chi_square(counts, expected, n) < CHI2_999[3]
    assert counts["r3"] / n > 0.6  # 1 / (1 + 1/4 + 1/9 + 1/16) = 0.70; with power 1 it would be 0.48
    with pytest.raises(ValueError, match="rank_power must be > 0"):
        make(rank_power=0.0)
