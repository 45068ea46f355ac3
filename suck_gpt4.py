"""Resurrect what an LLM was trained on: train a GFlowNet to sample inputs x in proportion to
R(x) = p(x) * p(y|x), with p(x) from a prior LM and p(y|x) from the LLM's own logprobs.

  export OPENAI_API_KEY=...
  python suck_gpt4.py --task raw --model gpt-4o-mini --batch-size 16 --epochs 500

Every flag is train.py's; this entry point keeps the defaults of the original command (OpenAI oracle,
gpt-4o-mini, GPT-2 prior).
"""

import sys

import flags

if __name__ == "__main__":
    flags.check_command_line(sys.argv[1:], __doc__)  # bad flags answer before torch loads
    from train import main

    sys.exit(main(description=__doc__))
