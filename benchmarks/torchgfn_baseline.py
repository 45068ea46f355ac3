"""torchgfn's own Trajectory Balance on an enumerable sequence target: the baseline for benchmarks/exact_target.py.

Sequences of 1..L tokens from a V-token vocabulary, built left to right (append a token) with an explicit STOP
(torchgfn's exit action); STOP is masked at the empty sequence and is the only action at length L. Each state has
one parent, so the DAG is a tree and P_B = 1: TBGFlowNet(pb=None, constant_pb=True), torchgfn's documented tree
setting. The forward policy is torchgfn's MLP over KHotPreprocessor's (position x token) one-hot encoding, trained
as in torchgfn's tutorials/examples/train_hypergrid_simple.py: on-policy sampling (epsilon 0, no exploration),
Adam with a separate log Z learning rate, gradient norm clipped to 1. The reward is a table indexed like
gflownet_policy.enumerate_sequences(V, 1, L), and the policy's exact distribution is computed over all of it.

Benchmark-only dependency. torchgfn declares numpy<2, which would downgrade the pinned numpy (it runs fine on
numpy 2), so it is installed without its dependencies, and the ones it imports are pinned in
benchmarks/requirements.txt:
  pip install -r benchmarks/requirements.txt && pip install --no-deps torchgfn==2.4.1

  python benchmarks/torchgfn_baseline.py      # seconds: a tiny smoke run, prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gfn.actions import Actions  # noqa: E402
from gfn.env import DiscreteEnv  # noqa: E402
from gfn.estimators import DiscretePolicyEstimator  # noqa: E402
from gfn.gflownet import TBGFlowNet  # noqa: E402
from gfn.preprocessors import KHotPreprocessor  # noqa: E402
from gfn.states import DiscreteStates  # noqa: E402
from gfn.utils.common import set_seed  # noqa: E402
from gfn.utils.modules import MLP  # noqa: E402

from evaluation import exact_distribution_metrics  # noqa: E402
from gflownet_policy import enumerate_sequences  # noqa: E402
from train import learning_rate_factor  # noqa: E402


class SequenceEnv(DiscreteEnv):
    """Actions 0..V-1 append that token, action V is STOP. A state is a length-L tensor padded with the token V
    (so KHotPreprocessor(V + 1, L) one-hot encodes it); s0 is all padding, s_f torchgfn's default (all int64 min)."""

    def __init__(self, log_reward: torch.Tensor, vocab_size: int, max_len: int):
        self.vocab_size, self.max_len = vocab_size, max_len
        self.log_reward_table = log_reward.float()
        self.reward_calls = 0  # terminal states scored, to check one reward call per trajectory
        super().__init__(
            n_actions=vocab_size + 1, s0=torch.full((max_len,), vocab_size, dtype=torch.long), state_shape=(max_len,)
        )

    def make_states_class(self) -> type[DiscreteStates]:
        env = self

        class SequenceStates(DiscreteStates):
            state_shape, s0, sf, n_actions = env.state_shape, env.s0, env.sf, env.n_actions

            def _compute_forward_masks(self) -> torch.Tensor:
                length = env.lengths(self.tensor).unsqueeze(-1)
                tokens = (length < env.max_len).expand(*self.batch_shape, env.vocab_size)
                return torch.cat([tokens, length >= 1], dim=-1)

            def _compute_backward_masks(self) -> torch.Tensor:
                # The only parent: remove the last token.
                length = env.lengths(self.tensor)
                last = self.tensor.gather(-1, (length - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
                masks = torch.zeros(*self.batch_shape, env.vocab_size, dtype=torch.bool, device=self.device)
                masks.scatter_(-1, last.clamp(0, env.vocab_size - 1).unsqueeze(-1), (length >= 1).unsqueeze(-1))
                return masks

        return SequenceStates

    def lengths(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor != self.vocab_size).sum(-1)

    def step(self, states: DiscreteStates, actions: Actions) -> DiscreteStates:
        tensor = states.tensor.clone()
        tensor.scatter_(-1, self.lengths(tensor).unsqueeze(-1), actions.tensor)
        return self.States(tensor)

    def backward_step(self, states: DiscreteStates, actions: Actions) -> DiscreteStates:
        tensor = states.tensor.clone()
        tensor.scatter_(-1, (self.lengths(tensor) - 1).unsqueeze(-1), self.vocab_size)
        return self.States(tensor)

    def sequence_index(self, tensor: torch.Tensor) -> torch.Tensor:
        """Row of enumerate_sequences(V, 1, L): sum of V**k for 1 <= k < n, plus the tokens read as a base-V
        number (first token most significant)."""
        length = self.lengths(tensor)
        value = torch.zeros_like(length)
        for position in range(self.max_len):
            inside = position < length
            value = torch.where(inside, value * self.vocab_size + tensor[..., position], value)
        offsets = torch.tensor([sum(self.vocab_size**k for k in range(1, n)) for n in range(self.max_len + 1)])
        return offsets[length] + value

    def log_reward(self, states: DiscreteStates) -> torch.Tensor:
        self.reward_calls += states.tensor.shape[0]
        return self.log_reward_table[self.sequence_index(states.tensor)]


def exact_log_probs(env: SequenceEnv, pf: DiscretePolicyEstimator) -> torch.Tensor:
    """log P_F(x) for every x, in enumerate_sequences order: the forward policy is evaluated once on every state
    (the empty prefix and all N sequences), and prefix log-probabilities are accumulated one length at a time
    (the children of prefix j at length n are rows j*V .. j*V + V-1 at length n + 1)."""
    V, L = env.vocab_size, env.max_len
    tokens, lengths = enumerate_sequences(V, 1, L)
    tokens[torch.arange(L) >= lengths.unsqueeze(-1)] = V
    states = env.States(torch.cat([env.s0.unsqueeze(0), tokens]))
    with torch.no_grad():
        log_pf = pf.to_probability_distribution(states, pf(states)).logits.double()  # normalised, masked: -inf
    by_length = torch.cat([torch.zeros(1, dtype=torch.long), lengths])
    prefix = torch.zeros(1, dtype=torch.float64)  # log P_F of reaching the empty sequence
    out = []
    for n in range(1, L + 1):
        parents = log_pf[by_length == n - 1]
        prefix = (prefix.unsqueeze(-1) + parents[:, :V]).reshape(-1)
        out.append(prefix + log_pf[by_length == n][:, V])  # STOP; forced (log 1 = 0) at length L
    return torch.cat(out)


def run_torchgfn_tb(
    log_reward: torch.Tensor,
    vocab_size: int,
    max_len: int,
    batch_size: int,
    reward_calls: int,
    eval_every_calls: int,
    seed: int = 0,
    lr: float = 1e-3,
    lr_logz: float = 1e-1,
    hidden_dim: int = 256,
    n_hidden_layers: int = 2,
    lr_schedule: str = "constant",
    lr_min_factor: float = 0.1,
    modes: torch.Tensor | None = None,
) -> list[dict]:
    """Train torchgfn's TB for reward_calls // batch_size steps of batch_size on-policy trajectories (one reward
    call each); lr_schedule "cosine" applies train.py's --lr-schedule cosine to both learning rates, so the
    baseline gets the same schedule as our runs. Returns one row per exact evaluation (at the start, every
    eval_every_calls reward calls and at
    the end): reward calls, training seconds so far (evaluation excluded), exact_distribution_metrics, log Z."""
    set_seed(seed)
    env = SequenceEnv(log_reward, vocab_size, max_len)
    assert len(log_reward) == sum(vocab_size**n for n in range(1, max_len + 1)), "log_reward must cover 1..L"
    preprocessor = KHotPreprocessor(height=vocab_size + 1, ndim=max_len)
    module = MLP(
        input_dim=preprocessor.output_dim,
        output_dim=env.n_actions,
        hidden_dim=hidden_dim,
        n_hidden_layers=n_hidden_layers,
    )
    pf = DiscretePolicyEstimator(module, env.n_actions, preprocessor=preprocessor, is_backward=False)
    gflownet = TBGFlowNet(pf=pf, pb=None, constant_pb=True, init_logZ=0.0)
    optimizer = torch.optim.Adam(gflownet.pf_pb_parameters(), lr=lr)
    optimizer.add_param_group({"params": gflownet.logz_parameters(), "lr": lr_logz})

    rows: list[dict] = []

    def evaluate(calls: int, seconds: float) -> None:
        log_p = exact_log_probs(env, pf)
        assert abs(float(log_p.exp().sum()) - 1.0) < 1e-4, "exact probabilities do not sum to 1"
        metrics = exact_distribution_metrics(log_p, log_reward, modes)
        log_z = gflownet.logZ.item()
        rows.append(
            {
                "reward_calls": calls,
                "seconds": round(seconds, 3),
                **metrics,
                "log_z": log_z,
                "log_z_error": abs(log_z - metrics["true_log_Z"]),
            }
        )

    train_seconds, next_eval = 0.0, eval_every_calls
    evaluate(0, 0.0)
    n_steps = reward_calls // batch_size
    schedule = argparse.Namespace(
        lr_schedule=lr_schedule, lr_min_factor=lr_min_factor, epochs=n_steps, lr_warmup_epochs=0
    )
    for step in range(1, n_steps + 1):
        started = time.perf_counter()
        for group, base_lr in zip(optimizer.param_groups, (lr, lr_logz)):
            group["lr"] = base_lr * learning_rate_factor(schedule, step)
        trajectories = gflownet.sample_trajectories(env, n=batch_size, save_logprobs=True)
        optimizer.zero_grad()
        loss = gflownet.loss(env, trajectories, recalculate_all_logprobs=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gflownet.parameters(), 1.0)
        optimizer.step()
        train_seconds += time.perf_counter() - started
        calls = step * batch_size
        assert env.reward_calls == calls, f"{env.reward_calls} reward calls after {calls} trajectories"
        if calls >= next_eval or step == n_steps:
            evaluate(calls, train_seconds)
            while next_eval <= calls:
                next_eval += eval_every_calls
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    table = torch.randn(sum(3**n for n in range(1, 4)), generator=torch.Generator().manual_seed(0)) * 2
    print(
        json.dumps(
            run_torchgfn_tb(
                table, vocab_size=3, max_len=3, batch_size=32, reward_calls=3200, eval_every_calls=1600, hidden_dim=64
            ),
            indent=1,
        )
    )
