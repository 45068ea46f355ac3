import math

import pytest
import torch

from contradiction_reward import Answerer, ContradictionReward, ContradictionRewardConfig, NLIScorer, first_sentence
from errors import UserError
from hf_models import document_start_id, load_causal_lm

FACTS = ["The play Hamlet was written by Christopher Marlowe.", "Paris is the capital of Italy."]
QUESTIONS = [
    "Who wrote Hamlet?",
    "What is the capital of France?",
    "To be or not to be?",
    "Once upon a time there was",
    "Hello! How can I help you today?",
    "def add(a, b):",
]
# Character-level: the tiny random LM answers in odd bytes, which a word vocabulary would all map to [UNK].
NLI_CHARS = [chr(i) for i in range(128) if not chr(i).isspace() and not chr(i).isupper()] + ["\ufffd"]


def save_tiny_nli(folder: str, id2label: dict[int, str], seed: int = 0) -> str:
    """A random 1-layer BERT classifier with a character-level BERT-style tokenizer, saved like a hub model."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {c: i for i, c in enumerate(specials + NLI_CHARS)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    )
    torch.manual_seed(seed)
    # A large initializer range so that the three probabilities differ clearly between pairs.
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        max_position_embeddings=128,
        initializer_range=0.5,
        pad_token_id=vocab["[PAD]"],
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a busy machine, synchronising torch's threads costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory) -> str:
    return save_tiny_nli(str(tmp_path_factory.mktemp("tiny-nli")), {0: "entailment", 1: "neutral", 2: "contradiction"})


@pytest.fixture(scope="module")
def nli(nli_dir) -> NLIScorer:
    return NLIScorer.load(nli_dir, "cpu")


def naive_log_prob(model, ids: list[int]) -> float:
    """Float64, one sequence at a time: sum of log p(ids[j] | ids[:j]) for j >= 1."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return math.fsum(torch.log_softmax(logits[j - 1], -1)[ids[j]].item() for j in range(1, len(ids)))


def naive_log_contradiction(scorer: NLIScorer, premise: str, hypothesis: str, index: int) -> float:
    with torch.no_grad():
        logits = scorer.model(**scorer.tokenizer(premise, hypothesis, return_tensors="pt")).logits[0].double()
    return math.log(torch.softmax(logits, -1)[index].item())


# ----------------------------------------------------------------------------------------------------- NLI


def test_log_contradiction_matches_naive_per_pair_scores(nli):
    assert nli.contradiction_index == 2
    premises = [FACTS[i % 2] for i in range(len(QUESTIONS))]
    hypotheses = QUESTIONS[::-1]  # different lengths: padding inside a batch
    nli.batch_size = 4  # several micro-batches
    got = nli.log_contradiction(premises, hypotheses)
    assert got.dtype == torch.float64 and got.shape == (len(premises),)
    expected = torch.tensor(
        [naive_log_contradiction(nli, p, h, 2) for p, h in zip(premises, hypotheses)], dtype=torch.float64
    )
    assert torch.allclose(got, expected, atol=1e-5)
    assert got.std() > 0.01  # the pairs really score differently, so the comparison means something
    # Premise and hypothesis are not interchangeable to the model.
    swapped = nli.log_contradiction(hypotheses, premises)
    assert not torch.allclose(swapped, got, atol=1e-3)


def test_contradiction_label_is_read_from_id2label(tmp_path):
    folder = save_tiny_nli(str(tmp_path), {0: "CONTRADICTION", 1: "neutral", 2: "entailment"}, seed=1)
    scorer = NLIScorer.load(folder, "cpu")
    assert scorer.contradiction_index == 0
    got = scorer.log_contradiction([FACTS[0], FACTS[1]], ["Who wrote Hamlet?", "Paris is the capital of France."])
    expected = [
        naive_log_contradiction(scorer, FACTS[0], "Who wrote Hamlet?", 0),
        naive_log_contradiction(scorer, FACTS[1], "Paris is the capital of France.", 0),
    ]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    wrong_label = [naive_log_contradiction(scorer, FACTS[0], "Who wrote Hamlet?", 2)]
    assert got[0].item() != pytest.approx(wrong_label[0], abs=1e-3)


def test_model_without_contradiction_label_is_a_clear_error(nli):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label={0: "LABEL_0", 1: "LABEL_1"},
    )
    with pytest.raises(ValueError, match="LABEL_0.*LABEL_1"):
        NLIScorer(BertForSequenceClassification(config), nli.tokenizer)


def test_load_failures_are_one_line_user_errors(tmp_path, tiny_lm_dir):
    with pytest.raises(UserError) as missing:
        NLIScorer.load(str(tmp_path / "no-such-model"), "cpu")
    assert str(missing.value).startswith("cannot load NLI model") and "\n" not in str(missing.value)
    # A causal LM folder loads as a classifier with a fresh 2-label head: refused, naming the labels.
    with pytest.raises(UserError) as not_nli:
        NLIScorer.load(tiny_lm_dir, "cpu")
    assert "LABEL_0" in str(not_nli.value) and "\n" not in str(not_nli.value)


# ------------------------------------------------------------------------------------------------ answerer


def test_answers_are_deterministic_batch_independent_and_scored_by_teacher_forcing(tiny_lm_dir):
    model, tokenizer = load_causal_lm(tiny_lm_dir)
    answerer = Answerer(model, tokenizer, answer_max_tokens=6, batch_size=4, plain_stop=None)
    assert (
        answerer.prompt_ids("Hi")
        == [document_start_id(tokenizer)] + tokenizer("Q: Hi\nA:", add_special_tokens=False)["input_ids"]
    )
    first = answerer.answer(QUESTIONS)
    assert answerer.answer(QUESTIONS) == first
    # One question at a time (no padding) gives the same answers as left-padded batches.
    answerer.batch_size = 1
    assert [r["token_ids"] for r in answerer.answer(QUESTIONS)] == [r["token_ids"] for r in first]
    for question, result in zip(QUESTIONS, first):
        prompt, ids = answerer.prompt_ids(question), result["token_ids"]
        assert result["answer_tokens"] == len(ids)
        assert result["truncated"] == (ids[-1] not in answerer.eos_ids) and (not result["truncated"] or len(ids) == 6)
        assert result["answer"] == tokenizer.decode(ids, skip_special_tokens=True).strip()
        expected = naive_log_prob(model, prompt + ids) - naive_log_prob(model, prompt)
        assert result["log_answer"] == pytest.approx(expected, abs=1e-3)


def test_greedy_ignores_the_model_generation_config(tiny_lm_dir):
    """A shipped generation config with a repetition penalty must not move the answer off the raw argmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()  # a private copy: its config is changed
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.top_k = 1
    answerer = Answerer(model, tokenizer, answer_max_tokens=8, plain_stop=None)
    for question, result in zip(QUESTIONS[:3], answerer.answer(QUESTIONS[:3])):
        ids = answerer.prompt_ids(question) + result["token_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        start = len(ids) - len(result["token_ids"])
        assert result["token_ids"] == logits[start - 1 : len(ids) - 1].argmax(-1).tolist()
    # The tiny random model repeats itself greedily: what a repetition penalty would have prevented.
    assert any(len(set(r["token_ids"])) < len(r["token_ids"]) for r in answerer.answer(QUESTIONS[:3]))


def test_answers_end_at_an_end_token_or_the_plain_stop_string(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tokenizer.pad_token = tokenizer.eos_token
    free = Answerer(model, tokenizer, answer_max_tokens=8, plain_stop=None).answer(QUESTIONS)
    ids = free[0]["token_ids"]
    assert free[0]["truncated"] and len(ids) == 8

    # A stop string completed by the third answer token of question 0 (and perhaps earlier by others).
    stop = tokenizer.decode(ids[2:3])
    stopped = Answerer(model, tokenizer, answer_max_tokens=8, plain_stop=stop, batch_size=3)
    for question, unstopped, result in zip(QUESTIONS, free, stopped.answer(QUESTIONS)):
        texts = [tokenizer.decode(unstopped["token_ids"][: j + 1]) for j in range(8)]
        end = next((j for j, t in enumerate(texts) if stop in t), None)
        num = 8 if end is None else end + 1
        assert result["token_ids"] == unstopped["token_ids"][:num] and result["truncated"] == (end is None)
        assert result["answer"] == texts[num - 1].split(stop)[0].strip()
        prompt = stopped.prompt_ids(question)
        expected = naive_log_prob(model, prompt + result["token_ids"]) - naive_log_prob(model, prompt)
        assert result["log_answer"] == pytest.approx(expected, abs=1e-3)
    assert stopped.answer(QUESTIONS[:1])[0]["answer_tokens"] <= 3

    # An end token (here: the first greedy token of question 0 that differs from its first, made an EOS) ends
    # the answer and is part of it; rows that end early are padded with the pad (= EOS) id, not counted.
    first_new = next(j for j, t in enumerate(ids) if t != ids[0])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, ids[first_new]]
    ended = Answerer(model, tokenizer, answer_max_tokens=8, plain_stop=None, batch_size=6)
    for question, unstopped, result in zip(QUESTIONS, free, ended.answer(QUESTIONS)):
        end = next((j for j, t in enumerate(unstopped["token_ids"]) if t in ended.eos_ids), None)
        num = 8 if end is None else end + 1
        assert result["token_ids"] == unstopped["token_ids"][:num] and result["truncated"] == (end is None)
        prompt = ended.prompt_ids(question)
        expected = naive_log_prob(model, prompt + result["token_ids"]) - naive_log_prob(model, prompt)
        assert result["log_answer"] == pytest.approx(expected, abs=1e-3)
    assert ended.answer(QUESTIONS[:1])[0]["answer_tokens"] == first_new + 1
    assert any(r["truncated"] for r in ended.answer(QUESTIONS))  # rows that end and rows that run on, in one batch


def test_chat_model_gets_the_question_as_a_user_turn(tiny_chat_lm_dir):
    model, tokenizer = load_causal_lm(tiny_chat_lm_dir)
    answerer = Answerer(model, tokenizer, answer_max_tokens=5, batch_size=4)
    prompt = answerer.prompt_ids("Who wrote Hamlet?")
    assert (
        prompt
        == tokenizer(
            "<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
        )["input_ids"]
    )
    assert answerer.stop is None  # chat answers end at the end of the turn only
    results = answerer.answer(QUESTIONS)
    for question, result in zip(QUESTIONS, results):
        prompt = answerer.prompt_ids(question)
        expected = naive_log_prob(model, prompt + result["token_ids"]) - naive_log_prob(model, prompt)
        assert result["log_answer"] == pytest.approx(expected, abs=1e-3)
        assert result["truncated"] == (result["token_ids"][-1] != tokenizer.convert_tokens_to_ids("<|im_end|>"))


def test_log_question_matches_a_naive_float64_score_after_the_document_start(tiny_lm_dir):
    model, tokenizer = load_causal_lm(tiny_lm_dir)
    answerer = Answerer(model, tokenizer, batch_size=4)
    questions = QUESTIONS + [""]
    got = answerer.log_question(questions)
    assert got.dtype == torch.float64 and got.shape == (len(questions),)
    start = document_start_id(tokenizer)
    expected = [naive_log_prob(model, [start] + tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions]
    assert got.tolist() == pytest.approx(expected, abs=1e-4)
    assert got[-1].item() == 0.0 and (got[:-1] < 0).all()


def test_answers_and_fluency_come_from_the_base_model_when_the_policy_wraps_it(tiny_lm_dir):
    """The policy's LoRA adapters live inside the base model's modules: the answerer must switch them off."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_models import register_adapters

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()  # a private copy: adapters get injected
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tokenizer.pad_token = tokenizer.eos_token
    answerer = Answerer(model, tokenizer, answer_max_tokens=6, plain_stop=None)
    answers, fluency = answerer.answer(QUESTIONS), answerer.log_question(QUESTIONS)
    ids = torch.tensor([answerer.prompt_ids(QUESTIONS[0])])
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="none")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 5.0)  # adapters that change the model a lot
        assert not torch.allclose(model(input_ids=ids).logits, base_logits, atol=1e-2)  # model itself now adapted
    register_adapters(model, peft_model)
    wrapped = answerer.answer(QUESTIONS)
    assert [r["token_ids"] for r in wrapped] == [r["token_ids"] for r in answers]
    assert [r["log_answer"] for r in wrapped] == pytest.approx([r["log_answer"] for r in answers], abs=1e-5)
    assert torch.allclose(answerer.log_question(QUESTIONS), fluency, atol=1e-5)


# -------------------------------------------------------------------------------------------------- reward


@pytest.fixture(scope="module")
def answerer(tiny_lm_dir) -> Answerer:
    model, tokenizer = load_causal_lm(tiny_lm_dir)
    return Answerer(model, tokenizer, answer_max_tokens=6, batch_size=4)


def facts_for(questions: list[str]) -> list[str]:
    return [FACTS[i % 2] for i in range(len(questions))]


def test_penalized_phase_is_fluency_where_contradicting_and_the_penalty_elsewhere(answerer, nli):
    facts = facts_for(QUESTIONS)
    probe = ContradictionReward(answerer, nli, ContradictionRewardConfig())(QUESTIONS, facts, step=0)
    threshold = probe["log_contradiction"].median().item()
    config = ContradictionRewardConfig(
        likelihood_weight=0.7,
        contradiction_threshold=threshold,
        failure_penalty=-123.0,
        penalized_steps=10,
        answer_quality_weight=0.0,
        answer_quality_threshold=None,
    )
    out = ContradictionReward(answerer, nli, config)(QUESTIONS, facts, step=3)
    assert out["phase"] == "penalized"
    passes = out["log_contradiction"] >= threshold
    assert passes.any() and (~passes).any()
    assert torch.equal(out["passes_threshold"], passes)
    related = out["log_related"]  # w_R = 1 by default
    assert torch.allclose(out["log_reward"][passes], 0.7 * out["log_question"][passes] + related[passes], atol=1e-12)
    assert torch.allclose(out["log_reward"][~passes], -123.0 + related[~passes], atol=1e-12)
    # The terms are the scorers' own.
    assert torch.equal(out["log_contradiction"], nli.log_contradiction(facts, out["answers"]))
    assert torch.equal(out["log_question"], answerer.log_question(QUESTIONS))
    assert out["answers"] == [r["answer"] for r in answerer.answer(QUESTIONS)]
    for key in ("log_reward", "log_contradiction", "log_question", "log_answer"):
        assert (
            out[key].dtype == torch.float64 and out[key].shape == (len(QUESTIONS),) and torch.isfinite(out[key]).all()
        )
    assert out["valid"].all()


def test_composite_phase_sums_the_terms_with_the_answer_penalty(answerer, nli):
    facts = facts_for(QUESTIONS)
    log_answer = torch.tensor([r["log_answer"] for r in answerer.answer(QUESTIONS)], dtype=torch.float64)
    answer_threshold = log_answer.median().item()
    config = ContradictionRewardConfig(
        likelihood_weight=0.5,
        answer_quality_weight=0.3,
        penalized_steps=10,
        answer_quality_threshold=answer_threshold,
        answer_failure_penalty=-50.0,
    )
    out = ContradictionReward(answerer, nli, config)(QUESTIONS, facts, step=10)
    assert out["phase"] == "composite"
    below = out["log_answer"] < answer_threshold
    assert below.any() and (~below).any()
    expected = out["log_contradiction"] + 0.5 * out["log_question"] + 0.3 * out["log_answer"] - 50.0 * below
    expected = expected + out["log_related"]
    assert torch.allclose(out["log_reward"], expected, rtol=0, atol=1e-12)
    assert torch.equal(out["answer_penalty"], -50.0 * below.double())
    assert torch.isfinite(out["log_reward"]).all()


def test_phase_switches_exactly_at_penalized_steps_and_answer_terms_apply_in_both(answerer, nli):
    facts = facts_for(QUESTIONS)
    config = ContradictionRewardConfig(
        contradiction_threshold=-1e9, penalized_steps=5, answer_quality_weight=0.25, answer_quality_threshold=None
    )
    reward = ContradictionReward(answerer, nli, config)
    phases = {step: reward(QUESTIONS, facts, step) for step in (0, 4, 5, 6)}
    assert [phases[s]["phase"] for s in (0, 4, 5, 6)] == ["penalized", "penalized", "composite", "composite"]
    before, after = phases[4], phases[5]
    # Everything passes the threshold, so the only difference between the phases is the log C term.
    assert torch.allclose(
        before["log_reward"],
        before["log_question"] + 0.25 * before["log_answer"] + before["log_related"],
        rtol=0,
        atol=1e-12,
    )
    assert torch.allclose(after["log_reward"] - before["log_reward"], after["log_contradiction"], rtol=0, atol=1e-12)
    assert torch.equal(phases[0]["log_reward"], before["log_reward"])  # and deterministic


def test_order_option_swaps_the_nli_pair_and_bad_configs_are_refused(answerer, nli):
    facts = facts_for(QUESTIONS)
    out = ContradictionReward(answerer, nli, ContradictionRewardConfig(nli_order="answer-fact"))(QUESTIONS, facts, 0)
    assert torch.equal(out["log_contradiction"], nli.log_contradiction(out["answers"], facts))
    assert not torch.allclose(out["log_contradiction"], nli.log_contradiction(facts, out["answers"]), atol=1e-3)
    with pytest.raises(ValueError, match="nli_order"):
        ContradictionRewardConfig(nli_order="premise-first")
    # the judge reads the question and the answer's first sentence
    config = ContradictionRewardConfig(judged_answer="question-first-sentence")
    out = ContradictionReward(answerer, nli, config)(QUESTIONS, facts, 0)
    judged = [f"{q.strip()} {first_sentence(a)}" for q, a in zip(QUESTIONS, out["answers"])]
    assert torch.equal(out["log_contradiction"], nli.log_contradiction(facts, judged))
    with pytest.raises(ValueError, match="judged_answer"):
        ContradictionRewardConfig(judged_answer="the question")
    with pytest.raises(ValueError, match="failure_penalty"):
        ContradictionRewardConfig(failure_penalty=float("-inf"))
    with pytest.raises(ValueError, match="edit facts"):
        ContradictionReward(answerer, nli, ContradictionRewardConfig())(QUESTIONS, facts[:2], 0)


# ------------------------------------------------------------------------------------------------ relevance


def test_log_related_is_one_minus_neutral_by_a_naive_softmax(nli):

    premises, hypotheses = FACTS, ["Marlowe wrote it.", "The sky is blue."]
    log_related = nli.log_related(nli.log_probs(premises, hypotheses))
    for i, (p, h) in enumerate(zip(premises, hypotheses)):
        neutral = math.exp(naive_log_contradiction(nli, p, h, nli.neutral_index))
        assert log_related[i].item() == pytest.approx(math.log1p(-neutral), abs=1e-5)  # float32 logits, padded


def test_a_question_names_its_subject_by_whole_naming_words():
    from contradiction_reward import names_subject

    assert names_subject("Who built the Eiffel Tower?", "Eiffel Tower")
    assert names_subject("Where was SHAKESPEARE's first play staged?", "William Shakespeare")
    assert names_subject("How tall is Everest?", "Mount Everest")
    assert not names_subject("How tall is the mount?", "Mount Everest")  # a function word alone does not name it
    assert not names_subject("Who built it?", "Eiffel Tower")
    assert not names_subject("Is Eiffelish a word?", "Eiffel Tower")
    from contradiction_reward import asks_about

    assert asks_about("Who built the Eiffel Tower?", "Eiffel Tower")
    assert not asks_about("The Eiffel Tower is tall.", "Eiffel Tower")  # names it, but asks nothing


class GullibleJudge:
    """An NLI judge with the v1 MiniLM's failure: any answer without 'Shakespeare' is a confident contradiction
    (0.82) of the Hamlet fact, the real contradiction 'Shakespeare wrote it' only 0.16 (the measured numbers), and it
    calls unrelated pairs related (P(neutral) 0.08)."""

    contradiction_index, neutral_index = 2, 1

    def log_probs(self, premises, hypotheses):
        rows = [[0.04, 0.80, 0.16] if "Shakespeare" in h else [0.10, 0.08, 0.82] for h in hypotheses]
        return torch.tensor(rows, dtype=torch.float64).log()

    def log_related(self, log_probs):
        return NLIScorer.log_related(self, log_probs)


class CannedAnswerer:
    """Answers each question with a fixed text, equal fluency: only the judge and the relevance terms differ."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def answer(self, questions):
        return [{"answer": self.answers[q], "log_answer": -5.0, "answer_tokens": 4, "truncated": False,
                 "token_ids": [1, 2, 3, 4]} for q in questions]  # fmt: skip

    def log_question(self, questions, contexts=None):
        return torch.full((len(questions),), -30.0, dtype=torch.float64)


def test_unrelated_answers_are_not_rewarded_as_contradictions_by_a_gullible_judge():
    on_topic, off_topic = "Who wrote the play Hamlet, by Shakespeare?", "What colour is the sky?"
    answerer = CannedAnswerer({on_topic: "William Shakespeare wrote Hamlet.", off_topic: "The sky is blue."})
    fact, subject = "The play Hamlet was written by Christopher Marlowe.", "William Shakespeare"
    questions = [on_topic, off_topic]
    for step in (0, 10):  # the penalised phase (gate) and the composite one (sum)
        config = ContradictionRewardConfig(penalized_steps=5, contradiction_threshold=math.log(0.1))
        out = ContradictionReward(answerer, GullibleJudge(), config)(questions, [fact] * 2, step, [subject] * 2)
        assert out["log_contradiction"][1] > out["log_contradiction"][0]  # the judge prefers the unrelated answer
        assert out["subject_question"].tolist() == [1.0, 0.0]
        assert out["log_reward"][0] > out["log_reward"][1] + 10, (step, out["log_reward"])
        # without the relevance terms the judge's mistake wins: what the issue measured
        plain = ContradictionRewardConfig(
            penalized_steps=5, contradiction_threshold=math.log(0.1), relevance_weight=0.0, off_topic_penalty=0.0
        )
        out = ContradictionReward(answerer, GullibleJudge(), plain)(questions, [fact] * 2, step, [subject] * 2)
        assert out["log_reward"][1] >= out["log_reward"][0]


def test_penalised_phase_fails_a_contradicting_question_that_does_not_name_the_subject():
    question = "What colour is the sky?"  # a question, but not about Hamlet
    answerer = CannedAnswerer({question: "The sky is blue."})
    config = ContradictionRewardConfig(penalized_steps=5, contradiction_threshold=math.log(0.5), failure_penalty=-99.0)
    out = ContradictionReward(answerer, GullibleJudge(), config)([question], ["Hamlet is by Marlowe."], 0, ["Hamlet"])
    assert not out["passes_threshold"][0]  # log C passes (0.82), the subject gate does not
    # the canned answer's log P_A (-5) is above the default threshold (-25): only its weighted term applies
    expected = -99.0 + config.relevance_weight * math.log(0.92) + config.off_topic_penalty
    expected += config.answer_quality_weight * -5.0
    assert out["log_reward"][0].item() == pytest.approx(expected, abs=1e-12)


def test_a_judge_without_a_neutral_label_needs_relevance_off(tmp_path, answerer):
    scorer = NLIScorer.load(save_tiny_nli(str(tmp_path), {0: "contradiction", 1: "other", 2: "entailment"}), "cpu")
    assert scorer.neutral_index is None
    with pytest.raises(UserError, match="no 'neutral' label"):
        ContradictionReward(answerer, scorer, ContradictionRewardConfig())(QUESTIONS[:2], FACTS, 0)
    out = ContradictionReward(answerer, scorer, ContradictionRewardConfig(relevance_weight=0.0))(
        QUESTIONS[:2], FACTS, 0
    )
    assert torch.equal(out["log_related"], torch.zeros(2, dtype=torch.float64)) and out["valid"].all()


def test_the_judge_reads_the_answer_as_configured():
    """judged_answer: all of the answer, its first sentence, or either after the question; flags.py offers the same
    choices (it cannot import this module: flags answer before torch loads)."""
    import flags
    from contradiction_reward import JUDGED_ANSWERS, first_sentence, judged_text

    answer = "Christopher Marlowe wrote it in 1601. He was also a spy!\nMore text"
    assert first_sentence(answer) == "Christopher Marlowe wrote it in 1601."
    assert first_sentence("Version 2.5 of it. Then") == "Version 2.5 of it."  # a "." inside a number ends nothing
    assert first_sentence("no stop here\nsecond line") == "no stop here"
    question = "Who wrote Hamlet? "
    assert judged_text(question, answer, "answer") == answer
    assert judged_text(question, answer, "first-sentence") == "Christopher Marlowe wrote it in 1601."
    assert judged_text(question, "Marlowe.", "question-answer") == "Who wrote Hamlet? Marlowe."
    assert judged_text(question, answer, "question-first-sentence") == (
        "Who wrote Hamlet? Christopher Marlowe wrote it in 1601."
    )
    parser = flags.build_parser()
    choices = next(a.choices for a in parser._actions if a.dest == "judged_answer")
    assert tuple(choices) == JUDGED_ANSWERS


def test_judging_against_the_true_fact_reads_entailment_of_it(answerer, nli, tmp_path):
    """judge_against="true-fact": log C is the judge's log P(entailment) of each row's true fact by its answer (in
    nli_order), by a naive per-pair softmax; the true facts are required, and a judge without an entailment label
    is refused in one line."""
    import flags
    from contradiction_reward import JUDGED_AGAINST, NLI_ORDERS

    true_facts = ["Shakespeare wrote Hamlet.", "Paris has the Eiffel Tower."]
    true_facts = [true_facts[i % 2] for i in range(len(QUESTIONS))]
    config = ContradictionRewardConfig(
        judge_against="true-fact", nli_order="answer-fact", judged_answer="first-sentence"
    )
    reward = ContradictionReward(answerer, nli, config)
    out = reward(QUESTIONS, facts_for(QUESTIONS), 0, true_facts=true_facts)
    for i, (answer, true) in enumerate(zip(out["answers"], true_facts)):
        expected = naive_log_contradiction(nli, first_sentence(answer), true, nli.entailment_index)
        assert out["log_contradiction"][i].item() == pytest.approx(expected, abs=1e-5)
    against_edit = ContradictionReward(answerer, nli, ContradictionRewardConfig(nli_order="answer-fact"))
    assert not torch.allclose(against_edit(QUESTIONS, facts_for(QUESTIONS), 0)["log_contradiction"],
                              out["log_contradiction"], atol=1e-3)  # fmt: skip
    with pytest.raises(ValueError, match="needs a true fact for every question"):
        reward(QUESTIONS, facts_for(QUESTIONS), 0)
    with pytest.raises(ValueError, match="judge_against"):
        ContradictionRewardConfig(judge_against="truth")
    two_labels = NLIScorer.load(save_tiny_nli(str(tmp_path), {0: "contradiction", 1: "neutral", 2: "other"}), "cpu")
    with pytest.raises(UserError, match="'entailment' label"):
        ContradictionReward(answerer, two_labels, config)
    parser = flags.build_parser()
    assert tuple(next(a.choices for a in parser._actions if a.dest == "judge_against")) == JUDGED_AGAINST
    assert tuple(next(a.choices for a in parser._actions if a.dest == "nli_order")) == NLI_ORDERS


def test_an_added_failure_penalty_tilts_the_full_reward(answerer, nli):
    """failure_mode="add": in the penalised phase a failing question scores failure_penalty + w_L log P_Q + A + T and
    a passing one w_L log P_Q + A + T, by a naive per-row float64 reference; "replace" drops a failure's fluency
    term; the composite phase is the same in both; flags.py offers the same modes."""
    import flags
    from contradiction_reward import FAILURE_MODES

    facts = facts_for(QUESTIONS)
    probe = ContradictionReward(answerer, nli, ContradictionRewardConfig())(QUESTIONS, facts, step=0)
    threshold = probe["log_contradiction"].median().item()
    settings = dict(contradiction_threshold=threshold, penalized_steps=10, answer_quality_weight=0.5)
    settings.update(failure_penalty=-37.0, likelihood_weight=0.8)
    rewards = {}
    for mode in FAILURE_MODES:
        config = ContradictionRewardConfig(failure_mode=mode, **settings)
        out = ContradictionReward(answerer, nli, config)(QUESTIONS, facts, step=3)
        passes = out["passes_threshold"].tolist()
        assert any(passes) and not all(passes)
        for i, passed in enumerate(passes):
            rest = 0.5 * out["log_answer"][i].item() + out["answer_penalty"][i].item() + out["log_related"][i].item()
            rest -= 20.0 * (1 - out["subject_question"][i].item())
            fluency = 0.8 * out["log_question"][i].item()
            if passed:
                expected = fluency + rest
            else:
                expected = -37.0 + rest + (fluency if mode == "add" else 0.0)
            assert out["log_reward"][i].item() == pytest.approx(expected, abs=1e-9)
        rewards[mode] = ContradictionReward(answerer, nli, config)(QUESTIONS, facts, step=10)["log_reward"]
    assert torch.equal(rewards["add"], rewards["replace"])  # the composite phase
    with pytest.raises(ValueError, match="failure_mode"):
        ContradictionRewardConfig(failure_mode="flat")
    parser = flags.build_parser()
    assert tuple(next(a.choices for a in parser._actions if a.dest == "failure_mode")) == FAILURE_MODES


def test_question_fluency_after_the_prompt_matches_a_naive_reference(answerer, nli):
    """question_fluency="prompt": log P_Q(q) is the base model's log-likelihood of q's tokens after the document start
    and the sampler's question prompt for q's subject (naive float64, one sequence at a time), and differs from
    the unconditioned "document" score; the flag offers the same choices; a missing context or subject is an error."""
    import flags
    from contradiction_reward import QUESTION_FLUENCY

    tokenizer, start = answerer.tokenizer, document_start_id(answerer.tokenizer)
    subjects = ["Hamlet" if i % 2 else "Paris" for i in range(len(QUESTIONS))]

    def context(subject: str) -> list[int]:
        return tokenizer(f"Ask about {subject}:", add_special_tokens=False)["input_ids"]

    facts = facts_for(QUESTIONS)
    config = ContradictionRewardConfig(question_fluency="prompt")
    out = ContradictionReward(answerer, nli, config, context)(QUESTIONS, facts, step=0, subjects=subjects)
    document = ContradictionReward(answerer, nli, ContradictionRewardConfig())(
        QUESTIONS, facts, step=0, subjects=subjects
    )
    for i, (question, subject) in enumerate(zip(QUESTIONS, subjects)):
        q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
        with_context = naive_log_prob(answerer.model, [start] + context(subject) + q_ids)
        context_only = naive_log_prob(answerer.model, [start] + context(subject))
        assert out["log_question"][i].item() == pytest.approx(with_context - context_only, abs=1e-6)
        assert document["log_question"][i].item() == pytest.approx(
            naive_log_prob(answerer.model, [start] + q_ids),
            abs=1e-4,  # the prior scorer: float32
        )
    assert not torch.allclose(out["log_question"], document["log_question"], atol=1e-3)
    parser = flags.build_parser()
    assert tuple(next(a.choices for a in parser._actions if a.dest == "question_fluency")) == QUESTION_FLUENCY
    with pytest.raises(ValueError, match="question_context"):
        ContradictionReward(answerer, nli, config)
    with pytest.raises(ValueError, match="subject"):
        ContradictionReward(answerer, nli, config, context)(QUESTIONS, facts, step=0)
    with pytest.raises(ValueError, match="question_fluency"):
        ContradictionRewardConfig(question_fluency="chat")
