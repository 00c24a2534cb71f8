"""Tiny, deterministic models and tokenizers built locally, for tests and the demo.

Nothing here touches the network: `build_tokenizer()` makes a character-level tokenizer and
`build_toy_family()` writes a tiny Llama base plus fine-tuned variants whose task vectors have a
known density, in Hugging Face format. `toy.experts.build_expert_family()` trains the demo's
base and its SFT and RLVR (GRPO-style) experts on verifiable arithmetic.
"""

from mergeaudit.toy.models import ToyFamily, build_toy_family, tiny_llama_config
from mergeaudit.toy.tokenizer import build_tokenizer

__all__ = ["ToyFamily", "build_toy_family", "build_tokenizer", "tiny_llama_config"]
