"""Fixtures: tiny real models saved to folders and loaded with from_pretrained, so the real loading code runs
and nothing is downloaded."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "To be or not to be, that is the question.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a little robot who loved to read books.",
    "Hello! How can I help you today?",
    "The capital of France is Paris, and the capital of Italy is Rome.",
] * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_gpt2(folder: str, tokenizer, seed: int = 0, n_embd: int = 32, init_range: float = 0.02) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=n_embd,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=init_range,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bpe_tokenizer(chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        SENTENCES,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.eos_token = "<|im_end|>"
    return tokenizer


# Special-token layouts of real model families, as their tokenizer_config.json files declare them:
# (special tokens in id order, bos, eos, unk, pad, expected document start, expected document end).
TOKEN_LAYOUTS = {
    "gpt2": (
        ["<|endoftext|>"],
        "<|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
        None,
        "<|endoftext|>",
        "<|endoftext|>",
    ),
    # SmolLM2 (and StarCoder): unk IS <|endoftext|> (id 0); BOS/EOS are the chat tokens.
    "smollm2": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|endoftext|>",
    ),
    "llama2": (["<unk>", "<s>", "</s>"], "<s>", "</s>", "<unk>", None, "<s>", "</s>"),
    # Llama-3 instruct: no unk; EOS is the end-of-turn <|eot_id|>, documents end with <|end_of_text|>.
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
        None,
        "<|begin_of_text|>",
        "<|end_of_text|>",
    ),
    # Qwen2 instruct: no BOS and no unk; pad is <|endoftext|>, EOS <|im_end|>.
    "qwen2": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        None,
        "<|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
    ),
}


def layout_tokenizer(layout: str):
    """A small byte-level BPE whose special tokens, BOS, EOS, unk and pad follow a real family's layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, unk, pad = TOKEN_LAYOUTS[layout][:5]
    raw = Tokenizer(models.BPE(unk_token=unk))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        SENTENCES,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    kwargs = {
        name: value
        for name, value in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad))
        if value is not None
    }
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, **kwargs)
    if "<|im_start|>" in specials:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def word_tokenizer(words: list[str]):
    """A word-level tokenizer: ids 0..len(words)-1 are the words, then <|endoftext|>. For enumerable targets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    vocab["<|endoftext|>"] = len(words)
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("tiny-gpt2")), bpe_tokenizer())


@pytest.fixture(scope="session")
def tiny_chat_lm_dir(tmp_path_factory) -> str:
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("tiny-chat")), bpe_tokenizer(chat=True), seed=1)


@pytest.fixture(scope="session")
def word_lm_dirs(tmp_path_factory) -> tuple[str, str]:
    """(prior, oracle): two random GPT-2s over a 4-word vocabulary, with large weights so rewards vary."""
    words = ["a", "b", "c", "d"]
    prior = save_tiny_gpt2(
        str(tmp_path_factory.mktemp("word-prior")), word_tokenizer(words), seed=2, n_embd=16, init_range=0.3
    )
    oracle = save_tiny_gpt2(
        str(tmp_path_factory.mktemp("word-oracle")), word_tokenizer(words), seed=3, n_embd=16, init_range=0.3
    )
    return prior, oracle


from collections.abc import Iterator  # noqa: E402  (for the fixture below)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A throwaway redis-server on a free local port, persistence off; skips when the binary is missing."""
    import shutil
    import socket
    import subprocess
    import time

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed: apt-get install redis-server")
    with socket.socket() as s:  # redis needs a concrete port: take a free one from the OS
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    log = open(workdir / "redis.log", "w")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(workdir / 'redis.log').read_text()[-2000:]}")
                time.sleep(0.02)
        yield url
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
