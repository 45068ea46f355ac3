"""Loading Hugging Face causal LMs and tokenizers by hub id, local folder or .gguf file, once per process.

The prior and a local oracle are often the same model (the demo uses one model for both): loading it twice
would double memory and start-up time, so loaded models are cached by (spec, device, dtype).
"""
from __future__ import annotations

import contextlib
import os

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


def load_causal_lm(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   reload: bool = False):
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


def document_start_id(tokenizer) -> int:
    """The id a text starts from when scoring it unconditionally. GPT-2-style models were trained on
    documents separated by <|endoftext|>, so that is the right context when the vocabulary has it (SmolLM2
    too, whose default BOS is the chat token <|im_start|>); otherwise the BOS, then the EOS token."""
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(endoftext, int) and endoftext != tokenizer.unk_token_id:
        return endoftext
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    raise UserError("tokenizer has neither <|endoftext|>, a BOS nor an EOS token to start a text from")


def document_end_id(tokenizer) -> int:
    """The token that ends a text: <|endoftext|> when the vocabulary has it (a chat model's EOS, such as
    SmolLM2's <|im_end|>, ends a turn, not a document), else the EOS token."""
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(endoftext, int) and endoftext != tokenizer.unk_token_id:
        return endoftext
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise UserError("tokenizer has neither <|endoftext|> nor an EOS token to end a text with")
