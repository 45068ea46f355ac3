import pytest
import torch

from gflownet_policy import LogZ, PolicyConfig, TransformerPolicy, enumerate_sequences


def make_policy(**overrides) -> TransformerPolicy:
    torch.manual_seed(0)
    config = dict(vocab_size=5, max_len=6, min_len=1, d_model=32, num_layers=2, num_heads=4)
    config.update(overrides)
    policy = TransformerPolicy(PolicyConfig(**config))
    # Larger weights than the init so that the distribution is far from uniform and errors show.
    with torch.no_grad():
        policy.head.weight.mul_(50)
    return policy


def test_kv_cache_sampling_log_probs_equal_teacher_forced_forward():
    policy = make_policy()
    torch.manual_seed(1)
    tokens, lengths, sampler_log_prob = policy.sample(64)
    assert len(set(lengths.tolist())) > 1  # varied lengths, so stop handling is exercised
    assert torch.allclose(sampler_log_prob, policy.log_pf(tokens, lengths), atol=1e-4)


def test_tempered_sampler_log_prob_is_the_tempered_policy_and_log_pf_is_untempered():
    policy = make_policy()
    torch.manual_seed(2)
    temperature, epsilon = 2.0, 0.1
    tokens, lengths, log_q = policy.sample(32, temperature=temperature, epsilon=epsilon)
    # naive reference: per-step loop over a full forward pass, tempered and epsilon-mixed
    bos = torch.full((32, 1), policy.start_id)
    logits, _ = policy._logits(torch.cat([bos, tokens], 1))
    expected = torch.zeros(32, dtype=torch.float64)
    for i in range(32):
        for t in range(int(lengths[i]) + 1):
            mask = policy._action_mask(t, 1)[0]
            probs = torch.softmax(logits[i, t].double().masked_fill(mask, float("-inf")) / temperature, -1)
            allowed = (~mask).double()
            probs = (1 - epsilon) * probs + epsilon * allowed / allowed.sum()
            action = policy.stop_id if t == int(lengths[i]) else int(tokens[i, t])
            expected[i] += torch.log(probs[action])
    assert torch.allclose(log_q.double(), expected, atol=1e-4)
    assert not torch.allclose(log_q, policy.log_pf(tokens, lengths), atol=1e-2)


def test_policy_is_a_distribution_over_every_sequence():
    policy = make_policy(vocab_size=3, max_len=4, min_len=2)
    tokens, lengths = enumerate_sequences(3, 2, 4)
    with torch.no_grad():
        total = policy.log_pf(tokens, lengths).double().exp().sum()
    assert abs(total.item() - 1.0) < 1e-5


def test_min_len_max_len_and_banned_tokens_are_respected():
    policy = make_policy(vocab_size=6, max_len=5, min_len=3, banned_token_ids=(2, 4))
    torch.manual_seed(3)
    tokens, lengths, _ = policy.sample(200, epsilon=0.5)
    assert lengths.min() >= 3 and lengths.max() <= 5
    for row, n in zip(tokens, lengths):
        assert not set(row[:n].tolist()) & {2, 4}
        assert (row[n:] == 0).all()


def test_log_z_initialises_to_mean_residual():
    log_z = LogZ()
    assert not bool(log_z.initialized)
    log_z.initialize_from(torch.tensor([-10.0, -20.0]), torch.tensor([-3.0, -1.0]))
    assert log_z().item() == pytest.approx(-13.0)
    assert bool(log_z.initialized)
    restored = LogZ()
    restored.load_state_dict(log_z.state_dict())
    assert bool(restored.initialized) and restored().item() == pytest.approx(-13.0)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="min_len"):
        PolicyConfig(vocab_size=5, min_len=4, max_len=3).validate()
    with pytest.raises(ValueError, match="divisible"):
        PolicyConfig(vocab_size=5, d_model=30, num_heads=4).validate()


def test_sampling_with_a_forced_prefix_keeps_it_and_scores_only_the_rest():
    """Local search re-completes x after its first `keep` tokens: those are kept as given, and the returned
    log-probability is that of the sampled steps alone (the per-step teacher-forced log P_F after keep)."""
    policy = make_policy()
    torch.manual_seed(3)
    start_tokens, start_lengths, _ = policy.sample(32)
    keep = torch.clamp(start_lengths - 2, min=0)
    tokens, lengths, log_q = policy.sample(32, prefix=(start_tokens, keep))
    for i in range(32):
        k = int(keep[i])
        assert tokens[i, :k].tolist() == start_tokens[i, :k].tolist() and int(lengths[i]) >= k
    per_step = policy.log_pf_per_step(tokens, lengths).detach()
    steps = torch.arange(per_step.shape[1]).unsqueeze(0)
    expected = torch.where(steps >= keep.unsqueeze(1), per_step, torch.zeros_like(per_step)).sum(1)
    assert torch.allclose(log_q, expected, atol=1e-4)
    assert not torch.equal(tokens, start_tokens)  # the rest really is re-sampled
