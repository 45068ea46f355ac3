import math

import pytest
import torch

from conftest import bpe_tokenizer, save_tiny_gpt2
from errors import UserError
from hf_models import document_start_id, load_causal_lm
from reward_oracle import TASKS, HFResponseOracle, OracleResult, PriorScorer, RewardModel, sum_token_logprobs


def naive_log_prob(model, ids: list[int]) -> float:
    """Float64, one sequence at a time, token by token from the full logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return math.fsum(torch.log_softmax(logits[j - 1], -1)[ids[j]].item() for j in range(1, len(ids)))


def random_batch(vocab: int, max_len: int, n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=generator)
    tokens = torch.randint(0, vocab, (n, max_len), generator=generator)
    tokens[torch.arange(max_len).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return tokens, lengths


def test_prior_scores_match_naive_reference_with_and_without_eos(tiny_lm_dir):
    model, tokenizer = load_causal_lm(tiny_lm_dir)
    start = document_start_id(tokenizer)
    assert start == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokens, lengths = random_batch(len(tokenizer) - 1, 7, 10)
    scorer = PriorScorer(model, tokenizer, batch_size=3)  # several micro-batches
    got = scorer.log_prob(tokens, lengths)
    expected = [naive_log_prob(model, [start] + t[:n].tolist()) for t, n in zip(tokens, lengths)]
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    with_eos = PriorScorer(model, tokenizer, include_eos=True).log_prob(tokens, lengths)
    expected_eos = [
        naive_log_prob(model, [start] + t[:n].tolist() + [tokenizer.eos_token_id]) for t, n in zip(tokens, lengths)
    ]
    assert torch.allclose(with_eos.double(), torch.tensor(expected_eos, dtype=torch.float64), atol=1e-4)
    assert (with_eos < got).all()


def test_fixed_target_oracle_matches_teacher_forcing(tiny_lm_dir):
    model, tokenizer = load_causal_lm(tiny_lm_dir)
    oracle = HFResponseOracle(model, tokenizer, TASKS["assistant"], target_response=" the question.", batch_size=2)
    texts = ["Hello there", "def add(a, b):", "x"]
    results = oracle.score(texts)
    target = tokenizer(" the question.", add_special_tokens=False)["input_ids"]
    for text, result in zip(texts, results):
        prompt = oracle.prompt_ids(text)
        assert prompt[0] == document_start_id(tokenizer)  # no chat template: plain prompt after the document start
        full = naive_log_prob(model, prompt + target)
        prefix = naive_log_prob(model, prompt)
        assert result.log_likelihood == pytest.approx(full - prefix, abs=1e-4)
        assert result.valid and result.num_tokens == len(target)


def test_sampled_response_log_likelihood_is_untempered_score_of_y(tiny_chat_lm_dir):
    model, tokenizer = load_causal_lm(tiny_chat_lm_dir)
    oracle = HFResponseOracle(model, tokenizer, TASKS["assistant"], temperature=0.7, max_new_tokens=6, batch_size=4)
    texts = ["Hello", "To be or not", "Once upon a time there was"]  # different prompt lengths: left padding
    prompt = oracle.prompt_ids(texts[0])
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in prompt  # chat template used for instruct models
    torch.manual_seed(0)
    results = oracle.score(texts)
    for text, result in zip(texts, results):
        y_ids = result.token_ids
        assert len(y_ids) == result.num_tokens
        assert result.truncated == (y_ids[-1] != tokenizer.eos_token_id)  # the end-of-turn token is part of y
        assert result.response == tokenizer.decode(y_ids)  # exactly, special tokens kept
        prompt = oracle.prompt_ids(text)
        expected = naive_log_prob(model, prompt + y_ids) - naive_log_prob(model, prompt)
        assert result.log_likelihood == pytest.approx(expected, abs=1e-3)
        assert result.truncated == (result.num_tokens == 6 and y_ids[-1] != tokenizer.eos_token_id)
    assert any(r.truncated for r in results)


def test_greedy_oracle_is_deterministic(tiny_lm_dir):
    model, tokenizer = load_causal_lm(tiny_lm_dir)
    oracle = HFResponseOracle(model, tokenizer, TASKS["raw"], temperature=0.0, max_new_tokens=5)
    torch.manual_seed(0)
    first = oracle.score(["The quick", "Hello"])
    torch.manual_seed(1)
    second = oracle.score(["The quick", "Hello"])
    assert [r.response for r in first] == [r.response for r in second]
    assert [r.log_likelihood for r in first] == pytest.approx([r.log_likelihood for r in second])


class FixedOracle:
    def __init__(self, results):
        self.results = results

    def score(self, texts):
        assert len(texts) == len(self.results)
        return self.results


def test_reward_model_weights_components_and_marks_failures_invalid(tiny_lm_dir):
    model, tokenizer = load_causal_lm(tiny_lm_dir)
    prior = PriorScorer(model, tokenizer)
    tokens, lengths = random_batch(len(tokenizer) - 1, 5, 3, seed=1)
    oracle = FixedOracle(
        [
            OracleResult("y", -2.0, 1),
            OracleResult.failed("HTTP 500"),
            OracleResult("y", float("nan"), 2, valid=False, error="logprob_sentinel"),
        ]
    )
    batch = RewardModel(tokenizer, prior, oracle, prior_weight=0.5, llm_weight=2.0)(tokens, lengths)
    log_prior = prior.log_prob(tokens, lengths).double()
    assert batch.log_reward[0].item() == pytest.approx(0.5 * log_prior[0].item() - 4.0)
    assert batch.valid.tolist() == [True, False, False]
    assert torch.isnan(batch.log_reward[1:]).all()  # failures are never silently given a reward
    assert batch.texts[0] == tokenizer.decode(tokens[0, : lengths[0]].tolist())
    prior_only = RewardModel(tokenizer, prior, None, llm_weight=0.0)(tokens, lengths)
    assert torch.allclose(prior_only.log_reward, log_prior)


def test_reference_term_is_the_priors_log_likelihood_of_y_after_x(tiny_lm_dir, tmp_path):
    """--reference-weight: log R = w_prior log p(x) + w_llm log p(y|x) - w_ref log p_prior(y|x), with
    log p_prior(y|x) checked against a naive float64 teacher-forced score of [start] + x + y under the prior.
    The oracle here is a different model with the same vocabulary (y scored as its own ids), then a text oracle
    (y re-encoded by the prior's tokenizer); a failed answer stays invalid."""
    prior_model, tokenizer = load_causal_lm(tiny_lm_dir)
    oracle_model, oracle_tokenizer = load_causal_lm(save_tiny_gpt2(str(tmp_path / "oracle"), bpe_tokenizer(), seed=5))
    start = document_start_id(tokenizer)
    prior = PriorScorer(prior_model, tokenizer)
    oracle = HFResponseOracle(oracle_model, oracle_tokenizer, TASKS["raw"], temperature=1.0, max_new_tokens=4)
    tokens, lengths = random_batch(len(tokenizer) - 1, 5, 4, seed=2)
    torch.manual_seed(0)
    batch = RewardModel(tokenizer, prior, oracle, prior_weight=0.5, llm_weight=2.0, reference_weight=1.5)(
        tokens, lengths
    )
    assert batch.valid.all()
    for i, result in enumerate(batch.oracle_results):
        x = tokens[i, : lengths[i]].tolist()
        expected = naive_log_prob(prior_model, [start] + x + result.token_ids) - naive_log_prob(
            prior_model, [start] + x
        )
        assert batch.terms["log_reference"][i].item() == pytest.approx(expected, abs=1e-6)
        log_prior = naive_log_prob(prior_model, [start] + x)
        assert batch.log_reward[i].item() == pytest.approx(
            0.5 * log_prior + 2.0 * result.log_likelihood - 1.5 * expected, abs=1e-4
        )
    # a text oracle (an API): y is the response re-encoded with the prior's tokenizer; failures stay NaN
    text_oracle = FixedOracle([OracleResult(" the question.", -2.0, 3), OracleResult.failed("HTTP 500")])
    tokens, lengths = random_batch(len(tokenizer) - 1, 5, 2, seed=3)
    batch = RewardModel(tokenizer, prior, text_oracle, reference_weight=1.0)(tokens, lengths)
    y = tokenizer(" the question.", add_special_tokens=False)["input_ids"]
    x = tokens[0, : lengths[0]].tolist()
    expected = naive_log_prob(prior_model, [start] + x + y) - naive_log_prob(prior_model, [start] + x)
    assert batch.terms["log_reference"][0].item() == pytest.approx(expected, abs=1e-6)
    assert batch.valid.tolist() == [True, False] and torch.isnan(batch.log_reward[1])
    # without the flag the term is absent and the formula unchanged
    assert "log_reference" not in RewardModel(tokenizer, prior, text_oracle)(tokens, lengths).terms


def test_sentinel_is_detected_not_summed():
    total, saw = sum_token_logprobs([-0.5, -9999.0, -1.0])
    assert saw and math.isnan(total)
    total, saw = sum_token_logprobs([-0.5, -1.0])
    assert not saw and total == pytest.approx(-1.5)


def test_unknown_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load model"):
        load_causal_lm(str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match="GGUF model file not found"):
        load_causal_lm(str(tmp_path / "missing.gguf"))
