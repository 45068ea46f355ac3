"""What crosses the boundary between the policy and a local oracle: the prompt format, x as the policy's own
token ids (not a decode-and-re-encode of them), y stored exactly, and every oracle evaluation counted once."""

import math

import pytest
import torch

from errors import UserError
from hf_models import document_start_id, load_causal_lm
from reward_oracle import TASKS, HFResponseOracle, PriorScorer, RewardModel


def naive_log_prob(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return math.fsum(torch.log_softmax(logits[j - 1], -1)[ids[j]].item() for j in range(1, len(ids)))


def test_oracle_format_plain_chat_and_auto(tiny_chat_lm_dir, tiny_lm_dir):
    model, tokenizer = load_causal_lm(tiny_chat_lm_dir)
    x = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    plain = HFResponseOracle(model, tokenizer, TASKS["raw"], prompt_format="plain")
    assert plain.prompt_ids(x) == [document_start_id(tokenizer)] + x  # --task raw, plain: x alone after the start
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for fmt in ("chat", "auto"):  # auto = the chat template when the tokenizer has one
        chat = HFResponseOracle(model, tokenizer, TASKS["assistant"], prompt_format=fmt)
        prompt = chat.prompt_ids(x)
        assert prompt[0] == im_start
        rendered = tokenizer.apply_chat_template(
            TASKS["assistant"].messages("Hello there"), add_generation_prompt=True, tokenize=False
        )
        assert tokenizer.decode(prompt) == rendered
        assert x == prompt[len(chat.prompt_before) : len(chat.prompt_before) + len(x)]
    base_model, base_tokenizer = load_causal_lm(tiny_lm_dir)
    assert HFResponseOracle(base_model, base_tokenizer, TASKS["raw"]).prompt_format == "plain"
    with pytest.raises(UserError, match="no chat template"):
        HFResponseOracle(base_model, base_tokenizer, TASKS["raw"], prompt_format="chat")


def non_canonical_ids(tokenizer, word: str) -> list[int]:
    """`word` spelled one character token at a time: decodes to the word, re-encodes to fewer tokens."""
    ids = [tokenizer.convert_tokens_to_ids(ch) for ch in word]
    assert tokenizer.decode(ids) == word and tokenizer(word, add_special_tokens=False)["input_ids"] != ids
    return ids


def test_local_oracle_scores_the_policys_token_ids(tiny_lm_dir):
    model, tokenizer = load_causal_lm(tiny_lm_dir)
    oracle = HFResponseOracle(model, tokenizer, TASKS["raw"], target_response=" the question.", prompt_format="plain")
    reward_model = RewardModel(tokenizer, PriorScorer(model, tokenizer), oracle)
    assert reward_model.oracle_takes_ids
    odd = non_canonical_ids(tokenizer, "quick")
    canonical = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    width = max(len(odd), len(canonical))
    tokens = torch.tensor([odd + [0] * (width - len(odd)), canonical + [0] * (width - len(canonical))])
    lengths = torch.tensor([len(odd), len(canonical)])
    batch = reward_model(tokens, lengths)
    target = tokenizer(" the question.", add_special_tokens=False)["input_ids"]
    start = document_start_id(tokenizer)
    for row, ids in enumerate([odd, canonical]):
        expected = naive_log_prob(model, [start] + ids + target) - naive_log_prob(model, [start] + ids)
        assert batch.log_likelihood[row].item() == pytest.approx(expected, abs=1e-4)
    assert batch.retokenises == [False, True]
    assert not batch.oracle_saw_text
    # the re-encoded spelling would have given another reward: the test can tell the two apart
    reencoded = tokenizer("quick", add_special_tokens=False)["input_ids"]
    other = naive_log_prob(model, [start] + reencoded + target) - naive_log_prob(model, [start] + reencoded)
    assert abs(other - batch.log_likelihood[0].item()) > 1e-3


def test_deterministic_oracle_scores_each_x_and_prefix_once_and_counts_them(tiny_lm_dir):
    model, tokenizer = load_causal_lm(tiny_lm_dir)
    oracle = HFResponseOracle(model, tokenizer, TASKS["raw"], target_response=" the question.", prompt_format="plain")
    sent = []
    score = oracle.score
    oracle.score = lambda texts, token_ids=None: (sent.extend(token_ids), score(texts, token_ids))[1]
    reward_model = RewardModel(tokenizer, PriorScorer(model, tokenizer), oracle)
    tokens = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 8, 0]])
    lengths = torch.tensor([3, 3, 2])
    reward_model(tokens, lengths)  # two distinct x
    assert sorted(map(tuple, sent)) == [(5, 6, 7), (5, 8)]
    assert reward_model.oracle_calls == 2 and reward_model.reward_calls == 3
    prefix = reward_model.prefix_log_rewards(tokens, lengths, min_len=1)
    # new prefixes only: (5,), (5, 6); (5, 6, 7) and (5, 8) were scored above
    assert sorted(map(tuple, sent)) == [(5,), (5, 6), (5, 6, 7), (5, 8)]
    assert reward_model.oracle_calls == 4
    assert reward_model.reward_calls == 3 + 5  # every proper prefix of every row is a reward evaluation
    reward_model.prefix_log_rewards(tokens, lengths, min_len=1)  # replayed: nothing new reaches the oracle
    assert reward_model.oracle_calls == 4 and len(sent) == 4
    full = reward_model(tokens, lengths).log_reward
    assert torch.allclose(prefix[torch.arange(3), lengths], full, atol=1e-4)


def test_sampled_y_is_stored_exactly_with_its_special_tokens(tiny_chat_lm_dir):
    model, tokenizer = load_causal_lm(tiny_chat_lm_dir)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    calls = []

    def force_endoftext_first(module, inputs, output):  # the first generated token is <|endoftext|>
        calls.append(1)
        if len(calls) == 1:
            output[:, -1, endoftext] += 100.0
        return output

    handle = model.lm_head.register_forward_hook(force_endoftext_first)
    try:
        oracle = HFResponseOracle(
            model, tokenizer, TASKS["raw"], temperature=0.0, max_new_tokens=4, prompt_format="plain"
        )
        (result,) = oracle.score(["Hello"])
    finally:
        handle.remove()
    # plain text: <|endoftext|> ends the document, so it ends y (this chat model's EOS is <|im_end|>)
    assert result.token_ids == [endoftext] and tokenizer.eos_token != "<|endoftext|>"
    assert result.response == tokenizer.decode(result.token_ids) == "<|endoftext|>"
    assert not result.truncated and result.num_tokens == 1


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sampling_y_logs_no_generation_flag_warnings(tiny_lm_dir, temperature):
    import logging

    import transformers

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library_logger = transformers.utils.logging.get_logger("transformers")
    transformers.utils.logging.warning_once.cache_clear()  # else printed once per process only
    library_logger.addHandler(handler)
    try:
        model, tokenizer = load_causal_lm(tiny_lm_dir)
        oracle = HFResponseOracle(model, tokenizer, TASKS["raw"], temperature=temperature, max_new_tokens=3)
        oracle.score(["Hello there", "The quick"])
    finally:
        library_logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
