"""Document-start and document-end tokens are chosen by what the vocabulary contains, for the special-token
layouts of real families (GPT-2, SmolLM2, Llama-2, Llama-3, Qwen2), and the prior scores x after that start
token: checked against a hand-computed teacher-forced sum."""

import math

import pytest
import torch

from conftest import TOKEN_LAYOUTS, layout_tokenizer, save_tiny_gpt2
from hf_models import describe_special_tokens, document_end_id, document_start_id, load_causal_lm
from reward_oracle import PriorScorer


@pytest.mark.parametrize("layout", sorted(TOKEN_LAYOUTS))
def test_document_tokens_follow_the_vocabulary(layout):
    tokenizer = layout_tokenizer(layout)
    expected_start, expected_end = TOKEN_LAYOUTS[layout][5:]
    assert tokenizer.convert_ids_to_tokens(document_start_id(tokenizer)) == expected_start
    assert tokenizer.convert_ids_to_tokens(document_end_id(tokenizer)) == expected_end
    assert repr(expected_start) in describe_special_tokens(tokenizer)


def test_smollm2_layout_is_not_fooled_by_unk():
    # The bug this guards against: unk == <|endoftext|> made the old check fall back to <|im_start|>.
    tokenizer = layout_tokenizer("smollm2")
    assert tokenizer.unk_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    assert document_start_id(tokenizer) == 0 and document_end_id(tokenizer) == 0
    assert tokenizer.bos_token_id != 0 and tokenizer.eos_token_id != 0


@pytest.mark.parametrize("layout", ["smollm2", "llama3", "qwen2"])
def test_prior_log_prob_is_the_teacher_forced_sum_after_the_document_start(layout, tmp_path):
    tokenizer = layout_tokenizer(layout)
    folder = save_tiny_gpt2(str(tmp_path / layout), tokenizer, seed=4, init_range=0.2)
    model, tokenizer = load_causal_lm(folder)
    x = tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    prior = PriorScorer(model, tokenizer)
    got = prior.log_prob(torch.tensor([x]), torch.tensor([len(x)])).item()
    # by hand: one forward pass per prefix, float64 log-softmax, the start token chosen for the family
    start = tokenizer.convert_tokens_to_ids(TOKEN_LAYOUTS[layout][5])
    expected = 0.0
    with torch.no_grad():
        for t in range(len(x)):
            logits = model(input_ids=torch.tensor([[start] + x[:t]])).logits[0, -1].double()
            expected += torch.log_softmax(logits, dim=-1)[x[t]].item()
    assert math.isclose(got, expected, abs_tol=1e-3)
    # and it differs from scoring after the tokenizer's BOS / EOS (what the old rule picked for SmolLM2)
    wrong_start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if wrong_start == start:  # Llama-3: its BOS is the document start
        return
    with torch.no_grad():
        wrong = sum(
            torch.log_softmax(model(input_ids=torch.tensor([[wrong_start] + x[:t]])).logits[0, -1].double(), -1)[
                x[t]
            ].item()
            for t in range(len(x))
        )
    assert abs(wrong - expected) > 1e-3
