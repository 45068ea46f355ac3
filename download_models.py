"""Pre-download the models of the contradictory-question task, so later runs work offline (HF_HUB_OFFLINE=1).

  python download_models.py                                   # gpt2-large, microsoft/deberta-large-mnli, gpt2
  python download_models.py --sampler gpt2 --cache-dir /data/hf

Roles: the sampler (the LM fine-tuned to ask questions), the frozen base LM that answers them (default: the
sampler's model), the NLI model that judges contradiction, and the prior LM. Each is fetched with the same
from_pretrained calls the runs make (AutoTokenizer + AutoModelForCausalLM, or AutoModelForSequenceClassification
for the NLI model): that downloads exactly the files a later offline load looks for, where
huggingface_hub.snapshot_download would fetch every format in the repository (gpt2's holds TF, Flax, ONNX and
Rust weights too), and it proves the model loads with the class that will use it. A model named twice is
fetched once. A local folder or .gguf file is left where it is.
"""

from __future__ import annotations

import argparse
import os
import sys

from errors import OneLineErrorParser, UserError, run_cli

CAUSAL_LM = "causal-lm"
NLI = "nli"


def looks_like_path(spec: str) -> bool:
    """Hub ids are 'name' or 'org/name'; these can only be paths on this machine."""
    return os.path.exists(spec) or spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf")


def check_local_model(spec: str) -> str:
    """A local model needs no download; check it is there and looks like a model, without copying it."""
    path = os.path.expanduser(spec)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.abspath(path)
    if not os.path.isdir(path):
        raise UserError(f"cannot download {spec}: no such local folder or .gguf file")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"cannot use local folder {spec}: it has no config.json, so it is not a saved model")
    return os.path.abspath(path)


def download_model(model_id: str, kind: str, cache_dir: str | None = None) -> str:
    """Fetch tokenizer and weights of a hub model into the cache; return the local snapshot folder."""
    from huggingface_hub import constants, try_to_load_from_cache
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_class = AutoModelForSequenceClassification if kind == NLI else AutoModelForCausalLM
    try:
        AutoTokenizer.from_pretrained(model_id, cache_dir=cache_dir)
        model = model_class.from_pretrained(model_id, cache_dir=cache_dir)
    except Exception as exc:  # no network, unknown id, gated repo, disk full, wrong model class: all one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if constants.HF_HUB_OFFLINE:
            reason += " (HF_HUB_OFFLINE is set: unset it to download)"
        raise UserError(f"cannot download {model_id}: {reason}") from None
    del model  # only the files were wanted; free the memory before the next model
    config_path = try_to_load_from_cache(model_id, "config.json", cache_dir=cache_dir)
    if isinstance(config_path, str):
        return os.path.dirname(config_path)
    return cache_dir or constants.HF_HUB_CACHE  # stored, but not where the cache lookup expects it


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampler", default="gpt2-large", help="hub id or folder of the question sampler's LM")
    parser.add_argument(
        "--base-model",
        default=None,
        help="hub id or folder of the frozen LM that answers the questions (default: --sampler)",
    )
    parser.add_argument(
        "--nli-model",
        default="microsoft/deberta-large-mnli",
        help="hub id or folder of the NLI model that judges contradiction",
    )
    parser.add_argument("--prior-model", default="gpt2", help="hub id or folder of the prior LM")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    roles = [
        ("sampler", args.sampler, CAUSAL_LM),
        ("base-model", args.base_model or args.sampler, CAUSAL_LM),
        ("nli-model", args.nli_model, NLI),
        ("prior-model", args.prior_model, CAUSAL_LM),
    ]
    done: dict[tuple[str, str], str] = {}  # (hub id, kind) -> its snapshot folder: fetch each once

    def body() -> None:
        for role, spec, kind in roles:
            if not spec.strip():
                raise UserError(f"--{role} is empty")
            if looks_like_path(spec):
                print(f"{role}: {spec} is already local ({check_local_model(spec)}), nothing to download", flush=True)
            elif (spec, kind) in done:
                print(f"{role}: {spec} -> {done[spec, kind]} (same as above)", flush=True)
            else:
                done[spec, kind] = download_model(spec, kind, args.cache_dir)
                print(f"{role}: {spec} -> {done[spec, kind]}", flush=True)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
