"""Loading Hugging Face causal LMs and tokenizers by hub id, local folder or .gguf file, once per process.

The prior and a local oracle are often the same model (the demo uses one model for both): loading it twice
would double memory and start-up time, so loaded models are cached by (spec, device, dtype).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from errors import UserError

_MODEL_CACHE: dict[tuple, tuple] = {}
# id(base model) -> the peft model that injected LoRA layers into it. Other users of the same weights (the
# prior, a local oracle) must run with the adapters switched off.
_ADAPTED: dict[int, object] = {}


def register_adapters(base_model, peft_model) -> None:
    _ADAPTED[id(base_model)] = peft_model


def without_adapters(model):
    """Context manager: run `model` as the pretrained LM even if a LoRA policy wraps it."""
    peft_model = _ADAPTED.get(id(model))
    return peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()


def split_model_spec(spec: str) -> tuple[str, str | None]:
    """'path/to/model.gguf' -> ('path/to', 'model.gguf'); anything else -> (spec, None)."""
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise UserError(f"GGUF model file not found: {spec}")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    return spec, None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"invalid --device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but CUDA is not available")
    return resolved


def load_causal_lm(
    spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, reload: bool = False
):
    """Return (model, tokenizer) in eval mode with gradients off. Errors name the model and the cause.
    reload=True loads fresh weights (a LoRA policy injects adapters into the model it wraps, so a new policy
    must not reuse weights an earlier one adapted); later calls for the same spec share the new copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    key = (spec, str(device), str(dtype))
    if key in _MODEL_CACHE and not reload:
        return _MODEL_CACHE[key]
    if key in _MODEL_CACHE:
        _ADAPTED.pop(id(_MODEL_CACHE.pop(key)[0]), None)
    path, gguf_file = split_model_spec(spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {spec!r}: {first_line}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:  # batching needs a pad id; its value never reaches a scored position
        tokenizer.pad_token = tokenizer.eos_token
    _MODEL_CACHE[key] = (model, tokenizer)
    return model, tokenizer


# Document boundaries by family, in order of preference. Chosen by what the vocabulary contains, never by
# comparing with the unknown token: SmolLM2's unk *is* <|endoftext|>, and Llama-3 has no unk at all.
#   GPT-2, SmolLM2, Qwen2, StarCoder: <|endoftext|> separates pretraining documents (start and end);
#   Llama-3: <|begin_of_text|> ... <|end_of_text|> (its instruct EOS <|eot_id|> ends a turn, not a document);
#   Llama-2, Mistral, Gemma: the tokenizer's own BOS / EOS (<s> ... </s>, <bos> ... <eos>).
DOCUMENT_START_TOKENS = ("<|endoftext|>", "<|begin_of_text|>")
DOCUMENT_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>")


def _first_in_vocabulary(tokenizer, candidates: tuple[str, ...]) -> int | None:
    vocabulary = tokenizer.get_vocab()  # includes added (special) tokens
    for token in candidates:
        if token in vocabulary:
            return vocabulary[token]
    return None


def document_start_id(tokenizer) -> int:
    """The id a text starts from when scoring it unconditionally: the family's document separator when the
    vocabulary has one (see DOCUMENT_START_TOKENS), else the BOS token, else the EOS token."""
    found = _first_in_vocabulary(tokenizer, DOCUMENT_START_TOKENS)
    for candidate in (found, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    raise UserError(
        "tokenizer has neither <|endoftext|>, <|begin_of_text|>, a BOS nor an EOS token to start a text from"
    )


def document_end_id(tokenizer) -> int:
    """The token that ends a document: <|endoftext|> or <|end_of_text|> when the vocabulary has one (a chat
    model's EOS, such as <|im_end|> or <|eot_id|>, ends a turn, not a document), else the EOS token."""
    found = _first_in_vocabulary(tokenizer, DOCUMENT_END_TOKENS)
    for candidate in (found, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    raise UserError("tokenizer has neither <|endoftext|>, <|end_of_text|> nor an EOS token to end a text with")


def describe_special_tokens(tokenizer) -> str:
    """One line for start-up: which ids start and end a document under this tokenizer."""
    start, end = document_start_id(tokenizer), document_end_id(tokenizer)
    return (
        f"document start {tokenizer.convert_ids_to_tokens(start)!r} (id {start}), "
        f"document end {tokenizer.convert_ids_to_tokens(end)!r} (id {end})"
    )


# ------------------------------------------------------------------------------------------------ generation


def end_token_ids(model, tokenizer) -> set[int]:
    """The model's own end tokens and the tokenizer's EOS: a chat model's end of turn may be missing from an old
    generation config, and stopping at either is right."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    return set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def generate_with_logprobs(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    end_ids: set[int],
    pad_id: int,
    temperature: float = 0.0,
    step_log_probs: bool = False,
):
    """Continue each prompt (sampled at `temperature`, greedy at 0) and return every row's generated ids (rows
    that ended early are padded after their end token) with the (B, T) float64 log-probability of each generated
    token under the model's raw, untempered logits, and with `step_log_probs` the (B, T, V) float32 log-softmax
    at every step too. Runs the pretrained model, adapters off. The local oracle and the contradiction task's
    answerer both generate through here."""
    from transformers import GenerationConfig  # lazily: transformers is slow to import

    device = next(model.parameters()).device
    width = max(map(len, prompts))
    # Left padding: every row's continuation starts at the same position.
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = temperature > 0
    # generate() fills every field left at None from the model's own generation config, whose top-k / top-p /
    # repetition penalty would move y off p(y|x) at this temperature, so they are switched off explicitly; the
    # sampling-only ones are passed only when sampling (transformers warns about each on a greedy run).
    sampling_settings = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if sampling else {}
    config = GenerationConfig(
        do_sample=sampling,
        **sampling_settings,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=sorted(end_ids),
        output_logits=True,
        return_dict_in_generate=True,
    )
    with without_adapters(model):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    generated = out.sequences[:, width:]
    log_probs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
    token_log_probs = log_probs.gather(2, generated.unsqueeze(2)).squeeze(2).double()
    if step_log_probs:
        return generated.tolist(), token_log_probs, log_probs
    return generated.tolist(), token_log_probs


@dataclass
class WrittenAndAnswered:
    """One row of `write_then_answer`: the x the model wrote (after its prompt), the raw log-probability of each
    x token, the (V,) log-softmax at each step where it chose an x token or stopped writing (with
    keep_x_log_probs), and y: its ids (the end token included when it ended), their raw log-probabilities, and
    whether it stopped at max_answer_tokens. `answer` is None when x stopped short of its minimum length."""

    x: list[int]
    x_log_probs: list[float]
    x_step_log_probs: list[torch.Tensor]
    answer: list[int] | None
    answer_log_probs: list[float]
    truncated: bool


@torch.no_grad()
def write_then_answer(
    model,
    prompts: list[list[int]],
    x_limits: list[int],
    x_minimums: list[int],
    x_stops: set[int],
    bridge: list[int],
    max_answer_tokens: int,
    answer_end_ids: set[int],
    pad_id: int,
    x_temperature: float,
    answer_temperature: float,
    keep_x_log_probs: bool = False,
) -> list[WrittenAndAnswered]:
    """One generation per prompt that first writes x and then answers it, the way one sampling call of a
    memorising model writes an opening and its continuation: x is written (greedy at x_temperature 0, else
    sampled) until x_limits[i] tokens or a token in x_stops (not kept: x ends before it); then the `bridge` ids (the
    prompt's part after x, e.g. a chat template's end of user turn) are read, and y is sampled at
    answer_temperature (greedy at 0) until a token in answer_end_ids or max_answer_tokens. One forward pass per
    position, with the KV cache: no token is read twice. Log-probabilities are under the raw, untempered model
    (as generate_with_logprobs reports them). A row whose x stops before x_minimums[i] tokens is not answered.
    Runs the pretrained model, adapters off."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    rows = [WrittenAndAnswered([], [], [], None, [], False) for _ in prompts]
    # each row's phase: "x" (writing x), then its bridge ids still to read, then "y" (answering), then "done"
    phase = ["x"] * len(prompts)
    pending = [list(bridge) for _ in prompts]

    def sample(logits: torch.Tensor, temperature: float) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1))

    def next_input(i: int, logits: torch.Tensor, log_probs: torch.Tensor) -> int | None:
        """Row i's next id to read given the model's output at its last one, or None when the row is done."""
        row = rows[i]
        if phase[i] == "x":
            if len(row.x) < x_limits[i]:
                choice = sample(logits, x_temperature)
                if keep_x_log_probs:
                    row.x_step_log_probs.append(log_probs.cpu())
                if choice not in x_stops:
                    row.x.append(choice)
                    row.x_log_probs.append(float(log_probs[choice]))
                    return choice
            if len(row.x) < x_minimums[i]:  # x stopped too soon: nothing to answer
                phase[i] = "done"
                return None
            phase[i] = "bridge"
        if phase[i] == "bridge":
            if pending[i]:
                return pending[i].pop(0)
            phase[i], row.answer = "y", []
        if phase[i] == "y":
            if len(row.answer) >= max_answer_tokens:
                phase[i], row.truncated = "done", True
                return None
            choice = sample(logits, answer_temperature)
            row.answer.append(choice)
            row.answer_log_probs.append(float(log_probs[choice]))
            if choice in answer_end_ids:
                phase[i] = "done"
                return None
            return choice
        return None

    past = None
    with without_adapters(model):
        while True:
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            out = model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions[:, -input_ids.shape[1] :],
                past_key_values=past,
                use_cache=True,
            )
            past, logits = out.past_key_values, out.logits[:, -1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            next_ids = [next_input(i, logits[i], log_probs[i]) for i in range(len(rows))]
            if all(token is None for token in next_ids):
                return rows
            input_ids = torch.tensor([[pad_id if t is None else t] for t in next_ids], device=device)
            attention = torch.cat([attention, torch.ones_like(input_ids)], dim=1)


# ------------------------------------------------------------------------------------------------ scoring


@torch.no_grad()
def continuation_log_likelihoods(
    model, start_id: int, prefixes: list[list[int]], continuations: list[list[int]], batch_size: int = 16
) -> list[float]:
    """log p(continuation | document start + prefix) by teacher forcing, in float64, batched (right padding is
    harmless for a causal model: padded positions come after every scored one; rows are batched by length). An
    empty continuation has log-likelihood 0. Runs the pretrained model, adapters off."""
    device = next(model.parameters()).device
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]) + len(continuations[i]))
    result = [0.0] * len(prefixes)
    for first in range(0, len(order), batch_size):
        part = order[first : first + batch_size]
        rows = [[start_id] + prefixes[i] + continuations[i] for i in part]
        width = max(map(len, rows))
        ids = torch.tensor([row + [start_id] * (width - len(row)) for row in rows], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
        with without_adapters(model):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        token_log_probs = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2).cpu()
        for row, i in enumerate(part):
            begin = len(prefixes[i])  # position of the first continuation token, shifted by the start token
            result[i] = float(token_log_probs[row, begin : begin + len(continuations[i])].sum())
    return result
