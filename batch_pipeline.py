"""Where the training loop's scored batches come from.

- `SyncBatches`: sample a batch, score it, hand it over. Deterministic: used with local oracles.
- `PrefetchBatches`: while the rewards of batch k are being fetched, the policy samples batch k+1, so an epoch
  takes about max(train step + sampling, API round trip) instead of their sum. Batch k+1 is sampled from the
  parameters before step k, one step stale. That is sound for trajectory balance: TB is an off-policy
  objective (any full-support sampler has the same optimum) and the loss always recomputes log P_F under the
  current parameters, so staleness only changes which x are explored, never the gradient's target.
- `BatchAPIBatches`: Batch API rounds. Sample a pool, submit it as one batch, wait, then hand the scored pool
  over in minibatches. The pending batch is checkpointed before the first poll, so a restart resumes it.

Every source calls `may_spend()` before it causes a new paid request, so a cost budget stops it cleanly.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from batch_api import collect_results, submit_batch, wait_for_batch
from reward_oracle import RewardBatch, padded_token_ids, replay_formula


@dataclass
class ScoredBatch:
    tokens: torch.Tensor
    lengths: torch.Tensor
    log_q: torch.Tensor  # the sampler's log-probability of each x (for off-policy metrics)
    rewards: RewardBatch
    condition: str = ""  # which log Z (and replay heap) the batch belongs to; "" when unconditional
    context: torch.Tensor | None = None  # prompt ids the policy was conditioned on
    written_by_oracle: torch.Tensor | None = None  # (B,) bool: x the oracle wrote itself
    # the oracle answered each x it wrote in the same generation (one call), else a written x cost one call more
    answered_when_written: bool = False
    local_search: torch.Tensor | None = None  # (B,) bool: x re-completed by local search from a replayed one

    def to(self, device: torch.device | str) -> "ScoredBatch":
        return dataclasses.replace(
            self,
            tokens=self.tokens.to(device),
            lengths=self.lengths.to(device),
            log_q=self.log_q.to(device),
            context=None if self.context is None else self.context.to(device),
            written_by_oracle=None if self.written_by_oracle is None else self.written_by_oracle.to(device),
            local_search=None if self.local_search is None else self.local_search.to(device),
        )

    def __getitem__(self, part: slice) -> "ScoredBatch":
        return dataclasses.replace(
            self,
            tokens=self.tokens[part],
            lengths=self.lengths[part],
            log_q=self.log_q[part],
            rewards=self.rewards[part],
            written_by_oracle=None if self.written_by_oracle is None else self.written_by_oracle[part],
            local_search=None if self.local_search is None else self.local_search[part],
        )


class BatchSource(Protocol):
    """Where the training loop's scored batches come from."""

    def next(self, more: bool = True) -> ScoredBatch | None:
        """The next scored batch; None when the budget stops it. more=False: the last batch of the run."""

    def drain(self) -> list[ScoredBatch]:
        """Batches paid for but not handed over, when training stops (their samples must still be written)."""

    def checkpoint_state(self) -> dict | None:
        """What a checkpoint holds so that a resumed run gets the same batches (None: nothing)."""


def exploration_settings(args, may_spend) -> dict:
    """The keyword arguments every source takes from the command line: batch size, exploration, the budget."""
    return dict(
        batch_size=args.batch_size,
        temperature=args.temperature,
        epsilon=args.epsilon,
        may_spend=may_spend,
        tempered_fraction=args.tempered_fraction,
        temperature_range=tuple(args.temperature_range),
        local_search_fraction=args.local_search_fraction,
        local_search_back=args.local_search_back,
        oracle_proposal_fraction=args.oracle_proposal_fraction,
        fresh_x_tries=args.fresh_x_tries,
    )


class SyncBatches:
    def __init__(
        self,
        policy,
        reward_model,
        batch_size: int,
        temperature: float,
        epsilon: float,
        may_spend,
        tempered_fraction: float = 0.0,
        temperature_range: tuple[float, float] = (1.0, 1.0),
        local_search_fraction: float = 0.0,
        local_search_back: int = 3,
        oracle_proposal_fraction: float = 0.0,
        fresh_x_tries: int = 0,
        replay=None,
        replay_rng=None,
        scored_texts: list[str] | None = None,
    ) -> None:
        self.policy, self.reward_model = policy, reward_model
        self.batch_size, self.temperature, self.epsilon = batch_size, temperature, epsilon
        self.may_spend = may_spend
        self.tempered_fraction, self.temperature_range = tempered_fraction, temperature_range
        self.local_search_fraction, self.local_search_back = local_search_fraction, local_search_back
        self.oracle_proposal_fraction = oracle_proposal_fraction  # train.py may move it on a schedule
        self.marks_written = oracle_proposal_fraction > 0  # rows say who wrote them, also once the share is 0
        self.marks_local = self.marks_written or local_search_fraction > 0
        self.num_local_search = 0
        self.num_written_by_oracle = 0
        self.proposal_answers: list = []  # the oracle's answers to the x it wrote for the batch being sampled
        self.replay, self.replay_rng = replay, replay_rng
        self.fresh_x_tries = fresh_x_tries
        # normalised x already sampled to be paid for in this run (--fresh-x-tries; kept in checkpoints)
        self.scored_texts: set[str] = set(scored_texts or ())
        self.redrawn = 0  # policy and local-search rows drawn again because their x had been paid for

    def sample(self, size: int | None = None, context: torch.Tensor | None = None):
        """A fresh batch: `oracle_proposal_fraction` of it written by the oracle itself (first), most of the rest
        at --temperature, `tempered_fraction` of it at one temperature drawn uniformly from `temperature_range`
        (drawn from the torch RNG, so runs stay reproducible), and, once the replay buffer holds anything,
        `local_search_fraction` of it re-completed from replayed x (last). Every part but the policy's own is
        an off-policy proposal, which trajectory balance may train on: its optimum does not depend on who
        proposed x."""
        size = size or self.batch_size
        num_local = round(self.local_search_fraction * size) if self.replay is not None and len(self.replay) else 0
        parts = []
        wanted = round(self.oracle_proposal_fraction * size)
        proposed = self.oracle_proposals(wanted, context) if wanted else None
        if proposed is not None:
            parts.append(proposed)
            self.remember(proposed[0], proposed[1])
        num_proposed = 0 if proposed is None else len(proposed[1])  # the policy makes up proposals too short to use
        num_local = min(num_local, size - num_proposed)  # shares moved on a schedule may round to one row too many
        self.num_local_search = num_local  # the batch's last rows (ScoredBatch.local_search)
        self.num_written_by_oracle = num_proposed  # the batch's first rows (ScoredBatch.written_by_oracle)
        num_tempered = round(self.tempered_fraction * (size - num_local - num_proposed))
        num_policy = size - num_local - num_tempered - num_proposed
        if num_policy:
            parts.append(
                self.fresh(
                    lambda n: self.policy.sample(
                        n, temperature=self.temperature, epsilon=self.epsilon, context=context
                    ),
                    num_policy,
                )
            )
        if num_tempered:
            low, high = self.temperature_range
            drawn = low + (high - low) * torch.rand(()).item()
            parts.append(
                self.fresh(
                    lambda n: self.policy.sample(n, temperature=drawn, epsilon=self.epsilon, context=context),
                    num_tempered,
                )
            )
        if num_local:
            parts.append(self.fresh(lambda n: self.local_search(n, context), num_local))
        return tuple(torch.cat(tensors) for tensors in zip(*parts))

    def fresh(self, draw, size: int):
        """draw(size) -> (tokens, lengths, log_q). With --fresh-x-tries K, a row whose x (normalised text, as the
        finds are counted) was already paid for in this run, or comes earlier in the batch, is drawn again, up to
        K times; one still repeated after that is kept (and paid for). Checking costs no oracle call; a repeat can
        never be a new find, and TB may train on the redrawn rows as on any off-policy proposal."""
        tokens, lengths, log_q = draw(size)
        if not self.fresh_x_tries:
            return tokens, lengths, log_q
        texts = self.normalised_texts(tokens, lengths)  # each row decoded once, a redrawn one when it is drawn
        for _ in range(self.fresh_x_tries):
            repeats = self.repeated_rows(texts)
            if not repeats:
                break
            self.redrawn += len(repeats)
            index = torch.tensor(repeats, device=tokens.device)
            tokens[index], lengths[index], log_q[index] = draw(len(repeats))
            for i, text in zip(repeats, self.normalised_texts(tokens[index], lengths[index])):
                texts[i] = text
        self.scored_texts.update(texts)
        return tokens, lengths, log_q

    def normalised_texts(self, tokens: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        from resurrect import normalised_text

        return [normalised_text(text) for text in self.reward_model.decode(tokens, lengths)]

    def repeated_rows(self, texts: list[str]) -> list[int]:
        """Rows whose normalised x was paid for already or appears earlier in these rows."""
        seen, repeats = set(self.scored_texts), []
        for i, text in enumerate(texts):
            if text in seen:
                repeats.append(i)
            seen.add(text)
        return repeats

    def remember(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        if self.fresh_x_tries:
            self.scored_texts.update(self.normalised_texts(tokens, lengths))

    @torch.no_grad()
    def oracle_proposals(self, size: int, context: torch.Tensor | None = None):
        """(tokens, lengths, log_q) of up to `size` x written by the oracle itself (RewardModel.propose_x, each a
        counted oracle call), or None when none was long enough; log_q is the policy's log P_F of them. When the
        oracle answers what it writes (RewardModel.answers_proposals), its answers are kept for `next` in
        `self.proposal_answers`: those x are not sent again."""
        config = self.policy.config
        bounds = (size, config.min_len, config.max_len, set(config.banned_token_ids))
        if self.reward_model.answers_proposals:
            rows, self.proposal_answers = self.reward_model.propose_answered(*bounds)
        else:
            rows = self.reward_model.propose_x(*bounds)
        if not rows:
            return None
        tokens, lengths = padded_token_ids(rows, config.max_len, self.policy.device)
        return tokens, lengths, self.policy.log_pf(tokens, lengths, context).float()

    def local_search(self, size: int, context: torch.Tensor | None = None):
        """Local search (Kim et al. 2024, "Local search GFlowNets"): x drawn from the replay buffer by its
        priority (the best-rewarded most often), its last `local_search_back` tokens dropped and re-sampled by
        the policy. Each candidate is scored like any fresh x (a paid call) and trained on."""
        items = self.replay.sample(
            size, log_reward=replay_formula(self.reward_model.formula), generator=self.replay_rng
        )
        rows = [item.token_ids for item in items]
        start, lengths = padded_token_ids(rows, self.policy.config.max_len, self.policy.device)
        keep = torch.clamp(lengths - self.local_search_back, min=0)
        return self.policy.sample(
            size, temperature=self.temperature, epsilon=self.epsilon, context=context, prefix=(start, keep)
        )

    def next(self, more: bool = True) -> ScoredBatch | None:
        """The next scored batch, or None when the budget is spent. more=False: no batch will be asked for
        after this one (the last epoch), so nothing may be sampled or paid for ahead of it."""
        if not self.may_spend():
            return None
        self.proposal_answers = []  # filled by oracle_proposals when the oracle answers what it writes
        tokens, lengths, log_q = self.sample()
        written = torch.arange(len(lengths)) < self.num_written_by_oracle if self.marks_written else None
        rewards = self.reward_model(tokens, lengths, answered=self.proposal_answers)
        answered = bool(self.proposal_answers)
        size = len(lengths)
        local = torch.arange(size) >= size - self.num_local_search if self.marks_local else None
        return ScoredBatch(
            tokens,
            lengths,
            log_q,
            rewards,
            written_by_oracle=written,
            answered_when_written=answered,
            local_search=local,
        )

    def drain(self) -> list[ScoredBatch]:
        """Scored batches that were paid for but not handed over when training stops (none here)."""
        return []

    def checkpoint_state(self) -> dict | None:
        return {"scored_texts": sorted(self.scored_texts)} if self.fresh_x_tries else None


class PrefetchBatches(SyncBatches):
    """The batch sent ahead is part of every checkpoint (`checkpoint_state`): a resumed run trains on exactly the
    x that were paid for (answered from the response cache) and its RNG, saved after sampling them, goes on
    as the uninterrupted run's would. Nothing is sent ahead of the last epoch."""

    def __init__(self, *args, pending_state: dict | None = None, **kwargs) -> None:
        super().__init__(*args, scored_texts=(pending_state or {}).get("scored_texts"), **kwargs)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.pending: tuple[tuple, Future] | None = None
        self.restored = pending_state

    def checkpoint_state(self) -> dict | None:
        state = super().checkpoint_state() or {}  # the x sent ahead were remembered when they were sampled
        if self.pending is not None:
            tokens, lengths, log_q, _ = self.pending[0]
            state["prefetched"] = {"tokens": tokens.cpu(), "lengths": lengths.cpu(), "log_q": log_q.cpu()}
        return state or None

    def _submit(self, restored: dict | None = None) -> None:
        if restored is not None:  # already paid for before the restart: no budget check, no sampling
            device = self.policy.device
            tokens, lengths, log_q = (restored[name].to(device) for name in ("tokens", "lengths", "log_q"))
        elif not self.may_spend():
            self.pending = None
            return
        else:
            tokens, lengths, log_q = self.sample()
        texts = self.reward_model.decode(tokens, lengths)
        # Only the oracle's requests run in the background; the prior is scored on this thread, so model
        # state (a LoRA policy switching its adapters off for the prior) is never touched from two threads.
        oracle_future = (
            self.executor.submit(self.reward_model.query_oracle, tokens, lengths, texts)
            if self.reward_model.uses_oracle
            else None
        )
        self.pending = ((tokens, lengths, log_q, texts), oracle_future)

    def _finish(self, pending) -> ScoredBatch:
        (tokens, lengths, log_q, texts), oracle_future = pending
        results = oracle_future.result() if oracle_future is not None else None
        return ScoredBatch(tokens, lengths, log_q, self.reward_model.combine(tokens, lengths, texts, results))

    def next(self, more: bool = True) -> ScoredBatch | None:
        if self.pending is None:
            restored, self.restored = (self.restored or {}).get("prefetched"), None
            self._submit(restored)
            if self.pending is None:
                return None
        current = self.pending
        # Sample and submit batch k+1 while batch k's requests are in flight, then wait for batch k.
        if more:
            self._submit()
        else:
            self.pending = None
        return self._finish(current)

    def drain(self) -> list[ScoredBatch]:
        """The batch scored ahead when training stops: paid for, so its samples must still be written."""
        drained = []
        if self.pending is not None:
            drained.append(self._finish(self.pending))
            self.pending = None
        self.executor.shutdown(wait=True)
        return drained


class BatchAPIBatches(SyncBatches):
    """The current round (batch id and the sampled pool) is part of every checkpoint (`checkpoint_state`), and
    `save_checkpoint()` is called right after submission, before the first poll. A run restarted from a
    checkpoint taken mid-pool collects that round again (free: its results are in the output file and the
    cache) and trains on the whole pool."""

    def __init__(
        self,
        *args,
        pool_size: int,
        poll_seconds: float,
        save_checkpoint,
        round_state: dict | None = None,
        on_poll=None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.pool_size, self.poll_seconds = pool_size, poll_seconds
        self.save_checkpoint, self.on_poll = save_checkpoint, on_poll
        self.round = round_state
        self.resumed = round_state is not None
        self.queue: list[ScoredBatch] = []

    def checkpoint_state(self) -> dict | None:
        return self.round

    def drain(self) -> list[ScoredBatch]:
        drained, self.queue = self.queue, []
        return drained

    def _round(self) -> bool:
        oracle = self.reward_model.oracle
        if not self.resumed:
            if not self.may_spend():
                return False
            tokens, lengths, log_q = self.sample(self.pool_size)
            texts = self.reward_model.decode(tokens, lengths)
            batch_id = submit_batch(oracle, texts)
            self.reward_model.count(0, len(texts))
            self.round = {
                "batch_id": batch_id,
                "tokens": tokens.cpu(),
                "lengths": lengths.cpu(),
                "log_q": log_q.cpu(),
                "texts": texts,
            }
            self.save_checkpoint()  # before polling: a restart must find this batch, not pay for it again
        self.resumed = False
        current, device = self.round, self.policy.device
        batch = (
            wait_for_batch(oracle, current["batch_id"], self.poll_seconds, on_poll=self.on_poll)
            if current["batch_id"]
            else None
        )
        results = collect_results(oracle, batch, current["texts"])
        tokens, lengths = current["tokens"].to(device), current["lengths"].to(device)
        rewards = self.reward_model.combine(tokens, lengths, current["texts"], results)
        pool = ScoredBatch(tokens, lengths, current["log_q"].to(device), rewards)
        for start in range(0, len(current["texts"]), self.batch_size):
            self.queue.append(pool[start : start + self.batch_size])
        return True

    def next(self, more: bool = True) -> ScoredBatch | None:
        if not self.queue and not self._round():
            return None
        return self.queue.pop(0)
