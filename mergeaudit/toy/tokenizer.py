"""A deterministic character-level tokenizer (tokenizers + PreTrainedTokenizerFast).

Every character of ALPHABET is one token; anything else maps to `<unk>`. Decoding concatenates
characters without spaces, so generations round-trip exactly, which matters for exact-match
scoring of arithmetic answers.

    tok = build_tokenizer()
    tok("12+7=")["input_ids"]
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
ALPHABET = string.digits + string.ascii_letters + " \n+-*/=?.,:;()'\"!%$#&<>[]{}_|\\^~@`"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer: fixed vocabulary, same ids on every machine."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab.setdefault(ch, len(vocab))
    # BPE with no merges over the whole string is exactly a character-level model.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="left",
    )
