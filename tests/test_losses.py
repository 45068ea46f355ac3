import pytest
import torch

from trajectory_balance import modified_subtb_loss, subtb_loss, trajectory_balance_loss, vargrad_log_z, vargrad_loss


def naive_tb_loss(log_z: float, log_pf_steps: list[list[float]], log_reward: list[float]) -> float:
    """Float64 reference: sum each trajectory's per-step log-probabilities in a Python loop."""
    total = 0.0
    for steps, log_r in zip(log_pf_steps, log_reward):
        residual = log_z
        for lp in steps:
            residual += lp
        residual -= log_r
        total += residual * residual
    return total / len(log_reward)


def test_tb_loss_matches_naive_float64_reference():
    generator = torch.Generator().manual_seed(0)
    steps = [
        (-torch.rand(int(n), generator=generator, dtype=torch.float64) * 5).tolist()
        for n in torch.randint(1, 9, (16,), generator=generator)
    ]
    log_reward = (torch.randn(16, generator=generator, dtype=torch.float64) * 20 - 30).tolist()
    log_z = 3.7
    expected = naive_tb_loss(log_z, steps, log_reward)
    log_pf = torch.tensor([sum(s) for s in steps], dtype=torch.float32)
    got = trajectory_balance_loss(torch.tensor(log_z), log_pf, torch.tensor(log_reward, dtype=torch.float32))
    assert abs(got.item() - expected) / expected < 1e-5


def test_tb_gradients_match_analytic_form():
    log_z = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    log_pf = torch.tensor([-3.0, -1.0, -2.5], dtype=torch.float64, requires_grad=True)
    log_reward = torch.tensor([-2.0, -4.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss = trajectory_balance_loss(log_z, log_pf, log_reward)
    loss.backward()
    residual = (0.5 + log_pf - log_reward).detach()
    assert torch.allclose(log_pf.grad, 2 * residual / 3)
    assert torch.allclose(log_z.grad, (2 * residual / 3).sum())
    assert log_reward.grad is None  # the reward is a target, not something to move


def test_tb_loss_rejects_mismatched_shapes():
    import pytest

    with pytest.raises(ValueError):
        trajectory_balance_loss(torch.tensor(0.0), torch.zeros(3), torch.zeros(4))


# --- SubTB(lambda), modified SubTB and VarGrad --------------------------------------------------


MAX_LEN = 6


def random_batch(seed: int, lengths: list[int], max_len: int = MAX_LEN, padding: float = float("nan")):
    """float64 (B, max_len + 1) log P_F steps, flows, log_stop, prefix rewards with `padding` past each
    sequence's last action, plus (B,) terminal rewards."""
    generator = torch.Generator().manual_seed(seed)
    batch, width = len(lengths), max_len + 1
    lengths_t = torch.tensor(lengths)
    past_end = torch.arange(width).unsqueeze(0) > lengths_t.unsqueeze(1)

    def table(scale: float, shift: float) -> torch.Tensor:
        values = torch.randn(batch, width, generator=generator, dtype=torch.float64) * scale + shift
        return values.masked_fill(past_end, padding)

    steps = -table(1.0, 0.0).abs() - 0.1
    flows = table(2.0, -3.0)
    log_stop = -table(1.0, 0.0).abs() - 0.05
    prefix_log_reward = table(3.0, -5.0)
    log_reward = torch.randn(batch, generator=generator, dtype=torch.float64) * 3 - 5
    return lengths_t, steps, flows, log_stop, prefix_log_reward, log_reward


def naive_subtb(steps, flows, log_reward, lengths, lam, log_z=None):
    """Float64 reference: explicit double loop over every sub-trajectory (i, j), 0 <= i < j <= n + 1."""
    total = 0.0
    for b, n in enumerate(lengths.tolist()):
        state_flow = [flows[b, t] for t in range(n + 1)] + [log_reward[b]]
        if log_z is not None:
            state_flow[0] = log_z if log_z.dim() == 0 else log_z[b]
        numerator, denominator = 0.0, 0.0
        for i in range(n + 2):
            for j in range(i + 1, n + 2):
                residual = state_flow[i] - state_flow[j]
                for t in range(i, j):
                    residual = residual + steps[b, t]
                numerator = numerator + lam ** (j - i) * residual**2
                denominator += lam ** (j - i)
        total = total + numerator / denominator
    return total / len(lengths)


def naive_modified_subtb(steps, log_stop, prefix_log_reward, lengths, min_len, log_z=None):
    """Float64 reference: explicit double loop over pairs min_len <= i < j <= n, uniform weights,
    mean over the trajectories that have at least one pair; with log_z also the pairs (0, j), j >= min_len,
    where the root's potential is log Z."""
    total, counted = 0.0, 0
    for b, n in enumerate(lengths.tolist()):
        squares, pairs = 0.0, 0
        if log_z is not None:
            for j in range(min_len, n + 1):
                residual = log_z - (prefix_log_reward[b, j] - log_stop[b, j])
                for t in range(0, j):
                    residual = residual + steps[b, t]
                squares = squares + residual**2
                pairs += 1
        for i in range(min_len, n + 1):
            for j in range(i + 1, n + 1):
                residual = (prefix_log_reward[b, i] - log_stop[b, i]) - (prefix_log_reward[b, j] - log_stop[b, j])
                for t in range(i, j):
                    residual = residual + steps[b, t]
                squares = squares + residual**2
                pairs += 1
        if pairs:
            total = total + squares / pairs
            counted += 1
    return total / max(counted, 1)


SUBTB_LENGTHS = [1, MAX_LEN, 3, 2, MAX_LEN, 4, 1, 5]


@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
def test_subtb_matches_naive_double_loop(lam):
    lengths, steps, flows, _, _, log_reward = random_batch(1, SUBTB_LENGTHS)
    expected = naive_subtb(steps, flows, log_reward, lengths, lam).item()
    got64 = subtb_loss(steps, flows, log_reward, lengths, lam=lam)
    got32 = subtb_loss(steps.float(), flows.float(), log_reward.float(), lengths, lam=lam)
    assert got64.dtype == torch.float64 and got32.dtype == torch.float32
    assert abs(got64.item() - expected) <= 1e-12 * abs(expected)
    assert abs(got32.item() - expected) <= 1e-5 * abs(expected)


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_subtb_with_log_z_matches_naive(lam):
    lengths, steps, flows, _, _, log_reward = random_batch(2, SUBTB_LENGTHS)
    for log_z in (
        torch.tensor(1.3, dtype=torch.float64),
        torch.linspace(-2, 2, len(SUBTB_LENGTHS), dtype=torch.float64),
    ):
        expected = naive_subtb(steps, flows, log_reward, lengths, lam, log_z=log_z).item()
        got = subtb_loss(steps, flows, log_reward, lengths, lam=lam, log_z=log_z).item()
        assert abs(got - expected) <= 1e-12 * abs(expected)


def test_subtb_gradients_match_naive_and_ignore_padding():
    lengths, steps, flows, _, _, log_reward = random_batch(3, SUBTB_LENGTHS)  # nan padding
    steps.requires_grad_(True)
    flows.requires_grad_(True)
    log_z = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    fast = subtb_loss(steps, flows, log_reward, lengths, lam=0.5, log_z=log_z)
    naive = naive_subtb(steps, flows, log_reward, lengths, 0.5, log_z=log_z)
    fast_grads = torch.autograd.grad(fast, (steps, flows, log_z))
    naive_grads = torch.autograd.grad(naive, (steps, flows, log_z), allow_unused=True)
    for fast_grad, naive_grad in zip(fast_grads, naive_grads):
        assert torch.isfinite(fast_grad).all()
        naive_grad = torch.zeros_like(fast_grad) if naive_grad is None else naive_grad
        assert torch.allclose(fast_grad, naive_grad, rtol=1e-10, atol=1e-12)
    past_end = torch.arange(MAX_LEN + 1).unsqueeze(0) > lengths.unsqueeze(1)
    assert (fast_grads[0][past_end] == 0).all()
    assert (fast_grads[1][past_end] == 0).all()
    assert (fast_grads[1][:, 0] == 0).all()  # log_z replaces log F(s_0)


def test_subtb_finite_difference_gradcheck():
    lengths, steps, flows, _, _, log_reward = random_batch(4, [1, 3, MAX_LEN], padding=7.0)
    assert torch.autograd.gradcheck(
        lambda s, f: subtb_loss(s, f, log_reward, lengths, lam=2.0),
        (steps.requires_grad_(True), flows.requires_grad_(True)),
    )


def consistent_flows(steps, lengths, log_z: float):
    """log F(s_t) = log Z + sum_{k<t} log P_F, log R = log Z + log P_F(tau): every SubTB residual is 0."""
    valid = torch.arange(steps.shape[1]).unsqueeze(0) <= lengths.unsqueeze(1)
    clean = torch.where(valid, steps, torch.zeros_like(steps))
    cumulative = torch.cumsum(clean, dim=1)
    flows = log_z + torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=1)
    return flows, log_z + clean.sum(dim=1)


@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0, 1e12])
def test_subtb_is_zero_for_consistent_flows_and_positive_when_perturbed(lam):
    lengths, steps, _, _, _, _ = random_batch(5, SUBTB_LENGTHS)
    flows, log_reward = consistent_flows(steps, lengths, log_z=2.5)
    assert subtb_loss(steps, flows, log_reward, lengths, lam=lam).item() < 1e-10
    assert (
        subtb_loss(steps, flows, log_reward, lengths, lam=lam, log_z=torch.tensor(2.5, dtype=torch.float64)).item()
        < 1e-10
    )
    perturbed = flows.clone()
    perturbed[1, 0] += 0.5  # log F(s_0) enters the full (TB) pair, which every lambda weights
    assert subtb_loss(steps, perturbed, log_reward, lengths, lam=lam).item() > 1e-3
    perturbed = flows.clone()
    perturbed[1, 3] += 0.5  # an interior state of the length-MAX_LEN trajectory
    interior = subtb_loss(steps, perturbed, log_reward, lengths, lam=lam).item()
    if lam <= 2.0:
        assert interior > 1e-4
    else:  # lam -> infinity is TB, blind to interior flows
        assert interior < 1e-20


def test_subtb_large_lambda_is_trajectory_balance_with_log_z_from_flow_head():
    lengths, steps, flows, _, _, log_reward = random_batch(6, SUBTB_LENGTHS)
    valid = torch.arange(MAX_LEN + 1).unsqueeze(0) <= lengths.unsqueeze(1)
    log_pf = torch.where(valid, steps, torch.zeros_like(steps)).sum(dim=1)
    tb = trajectory_balance_loss(flows[:, 0], log_pf, log_reward).item()
    assert abs(subtb_loss(steps, flows, log_reward, lengths, lam=1e12).item() - tb) <= 1e-8 * tb
    # ...and a moderate lambda is something else.
    assert abs(subtb_loss(steps, flows, log_reward, lengths, lam=1.0).item() - tb) > 1e-3 * tb


def test_subtb_rejects_bad_arguments():
    lengths, steps, flows, _, _, log_reward = random_batch(7, [2, 3])
    with pytest.raises(ValueError):
        subtb_loss(steps, flows, log_reward, lengths, lam=0.0)
    with pytest.raises(ValueError):
        subtb_loss(steps, flows, log_reward, torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        subtb_loss(steps, flows, log_reward, torch.tensor([2, MAX_LEN + 1]))
    with pytest.raises(ValueError):
        subtb_loss(steps, flows[:, :-1], log_reward, lengths)


MODIFIED_LENGTHS = [1, 2, MAX_LEN, 3, 2, MAX_LEN, 4, 5]


def forbid_early_stop(log_stop, lengths, min_len):
    """What the policy produces: STOP impossible below min_len, forced (log 1 = 0) at max_len."""
    log_stop = log_stop.clone()
    log_stop[:, :min_len] = float("-inf")
    log_stop[lengths == MAX_LEN, MAX_LEN] = 0.0
    return log_stop


@pytest.mark.parametrize("min_len", [1, 2])
def test_modified_subtb_matches_naive_double_loop(min_len):
    lengths, steps, _, log_stop, prefix_log_reward, _ = random_batch(8, [max(n, min_len) for n in MODIFIED_LENGTHS])
    log_stop = forbid_early_stop(log_stop, lengths, min_len)
    expected = naive_modified_subtb(steps, log_stop, prefix_log_reward, lengths, min_len).item()
    got64 = modified_subtb_loss(steps, log_stop, prefix_log_reward, lengths, min_len=min_len)
    got32 = modified_subtb_loss(steps.float(), log_stop.float(), prefix_log_reward.float(), lengths, min_len=min_len)
    assert got64.dtype == torch.float64 and got32.dtype == torch.float32
    assert expected > 0
    assert abs(got64.item() - expected) <= 1e-12 * expected
    assert abs(got32.item() - expected) <= 1e-5 * expected


@pytest.mark.parametrize("min_len", [1, 2])
def test_modified_subtb_with_root_log_z_matches_naive_double_loop(min_len):
    lengths, steps, _, log_stop, prefix_log_reward, _ = random_batch(11, [max(n, min_len) for n in MODIFIED_LENGTHS])
    log_stop = forbid_early_stop(log_stop, lengths, min_len)
    log_z = torch.tensor(-1.7, dtype=torch.float64, requires_grad=True)
    steps.requires_grad_(True)
    expected = naive_modified_subtb(steps, log_stop, prefix_log_reward, lengths, min_len, log_z=log_z)
    got = modified_subtb_loss(steps, log_stop, prefix_log_reward, lengths, min_len=min_len, log_z=log_z)
    assert abs(got.item() - expected.item()) <= 1e-12 * expected.item()
    without_root = modified_subtb_loss(steps, log_stop, prefix_log_reward, lengths, min_len=min_len)
    assert abs(got.item() - without_root.item()) > 1e-6
    fast_grads = torch.autograd.grad(got, (steps, log_z))
    naive_grads = torch.autograd.grad(expected, (steps, log_z))
    for fast_grad, naive_grad in zip(fast_grads, naive_grads):
        assert torch.allclose(fast_grad, naive_grad, rtol=1e-10, atol=1e-12)
    assert (fast_grads[0][:, 0] != 0).any()  # the first action is now trained


@pytest.mark.parametrize("min_len", [1, 2])
def test_modified_subtb_gradients_match_naive(min_len):
    lengths, steps, _, log_stop, prefix_log_reward, _ = random_batch(9, [max(n, min_len) for n in MODIFIED_LENGTHS])
    log_stop = forbid_early_stop(log_stop, lengths, min_len).requires_grad_(True)
    steps.requires_grad_(True)
    fast = modified_subtb_loss(steps, log_stop, prefix_log_reward, lengths, min_len=min_len)
    naive = naive_modified_subtb(steps, log_stop, prefix_log_reward, lengths, min_len)
    fast_grads = torch.autograd.grad(fast, (steps, log_stop))
    naive_grads = torch.autograd.grad(naive, (steps, log_stop), allow_unused=True)
    for fast_grad, naive_grad in zip(fast_grads, naive_grads):
        assert torch.isfinite(fast_grad).all()
        naive_grad = torch.zeros_like(fast_grad) if naive_grad is None else naive_grad
        assert torch.allclose(fast_grad, naive_grad, rtol=1e-10, atol=1e-12)
    # The STOP action of the taken trajectory (column n) never enters a modified-SubTB residual.
    assert (fast_grads[0].gather(1, lengths.unsqueeze(1)) == 0).all()


def test_modified_subtb_finite_difference_gradcheck():
    lengths, steps, _, log_stop, prefix_log_reward, _ = random_batch(10, [2, 4, MAX_LEN], padding=3.0)
    assert torch.autograd.gradcheck(
        lambda s, stop: modified_subtb_loss(s, stop, prefix_log_reward, lengths, min_len=2),
        (steps.requires_grad_(True), log_stop.requires_grad_(True)),
    )


@pytest.mark.parametrize("min_len", [1, 2])
def test_modified_subtb_is_zero_iff_policy_proportional_to_prefix_rewards(min_len):
    lengths, steps, _, log_stop, _, _ = random_batch(11, [max(n, min_len) for n in MODIFIED_LENGTHS])
    log_stop = forbid_early_stop(log_stop, lengths, min_len)
    valid = torch.arange(MAX_LEN + 1).unsqueeze(0) < lengths.unsqueeze(1)
    tokens = torch.where(valid, steps, torch.zeros_like(steps))
    prefix_log_pf = torch.cat([torch.zeros_like(tokens[:, :1]), torch.cumsum(tokens, dim=1)[:, :-1]], dim=1)
    # log R(s_t T) = C + log P_F(s_t) + log P_F(T | s_t): P_F(x T) is exactly proportional to R(x T).
    prefix_log_reward = -4.2 + prefix_log_pf + log_stop
    assert modified_subtb_loss(steps, log_stop, prefix_log_reward, lengths, min_len=min_len).item() < 1e-20
    perturbed = prefix_log_reward.clone()
    perturbed[2, MAX_LEN] += 0.3  # the forced-stop terminal of a max-length sequence counts too
    assert modified_subtb_loss(steps, log_stop, perturbed, lengths, min_len=min_len).item() > 1e-4
    perturbed = prefix_log_reward.clone()
    perturbed[5, min_len] -= 0.3  # the shortest terminable prefix counts too
    assert modified_subtb_loss(steps, log_stop, perturbed, lengths, min_len=min_len).item() > 1e-4
    perturbed = prefix_log_reward.clone()
    perturbed[:, :min_len] += 100.0  # prefixes below min_len cannot terminate: ignored
    assert modified_subtb_loss(steps, log_stop, perturbed, lengths, min_len=min_len).item() < 1e-20


def test_modified_subtb_without_pairs_is_a_connected_zero():
    lengths, steps, _, log_stop, prefix_log_reward, _ = random_batch(12, [2, 2, 2])
    steps.requires_grad_(True)
    log_stop = forbid_early_stop(log_stop, lengths, 2).requires_grad_(True)
    loss = modified_subtb_loss(steps, log_stop, prefix_log_reward, lengths, min_len=2)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    grads = torch.autograd.grad(loss, (steps, log_stop))
    assert all((g == 0).all() for g in grads)
    with pytest.raises(ValueError):  # a length below min_len cannot come from the policy
        modified_subtb_loss(steps, log_stop, prefix_log_reward, torch.tensor([1, 2, 2]), min_len=2)


def naive_vargrad(log_pf: list[float], log_reward: list[float]) -> float:
    residuals = [p - r for p, r in zip(log_pf, log_reward)]
    mean = sum(residuals) / len(residuals)
    return sum((r - mean) ** 2 for r in residuals) / len(residuals)


def test_vargrad_matches_naive_and_analytic_gradient():
    generator = torch.Generator().manual_seed(13)
    log_pf = (-torch.rand(9, generator=generator, dtype=torch.float64) * 20).requires_grad_(True)
    log_reward = torch.randn(9, generator=generator, dtype=torch.float64) * 5
    expected = naive_vargrad(log_pf.tolist(), log_reward.tolist())
    loss = vargrad_loss(log_pf, log_reward)
    assert abs(loss.item() - expected) <= 1e-12 * expected
    assert vargrad_loss(log_pf.float(), log_reward.float()).dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, log_pf)
    residual = (log_pf - log_reward).detach()
    assert torch.allclose(grad, 2 * (residual - residual.mean()) / 9)
    assert abs(vargrad_log_z(log_pf, log_reward) - (log_reward - log_pf).mean().item()) < 1e-12


def test_vargrad_shift_invariance_and_zero_iff_equal_residuals():
    generator = torch.Generator().manual_seed(14)
    log_pf = -torch.rand(6, generator=generator, dtype=torch.float64) * 10
    log_reward = torch.randn(6, generator=generator, dtype=torch.float64)
    base = vargrad_loss(log_pf, log_reward).item()
    assert base > 0
    assert abs(vargrad_loss(log_pf, log_reward + 123.4).item() - base) <= 1e-9 * base
    assert vargrad_loss(log_pf, log_pf - 3.0).item() < 1e-24  # all residuals equal: log Z = 3
    assert abs(vargrad_log_z(log_pf, log_pf - 3.0) + 3.0) < 1e-12
    almost = log_pf - 3.0
    almost[4] += 1e-3
    assert vargrad_loss(log_pf, almost).item() > 0
    with pytest.raises(ValueError):
        vargrad_loss(log_pf[:1], log_reward[:1])
