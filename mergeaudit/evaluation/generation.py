"""What a backend knows about each generation besides its text: whether it ran out of its token
budget, and how many tokens it produced.

lm-eval's models return only the generated text, with stop sequences cut off. Our backends
(`TracedHFLM` here for in-process HF models, the served models in
`mergeaudit.evaluation.served`) record, per returned text, a `GenerationInfo` in their
`generation_info` dict; the runner looks each logged completion up there. A text maps to one
outcome: two generations with the same text hold the same tokens, so both reached the budget
or neither did.

- truncated: the generation used its whole `max_gen_toks` budget without producing a stop
  sequence or the end-of-sequence token (an OpenAI-compatible server says
  `finish_reason: "length"`). A truncated generation is scored wrong.
- tokens: generated tokens up to the stop (None when the backend cannot say; the runner then
  counts the text's tokens with the model's tokenizer).

    lm = TracedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    ... lm-eval runs ...
    lm.generation_info["12"]  # GenerationInfo(truncated=False, tokens=2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GenerationInfo:
    truncated: bool
    tokens: int | None = None


def traced_hflm_class() -> type:
    """lm-eval's HFLM with `generation_info` recorded per generated text (built lazily: importing
    lm-eval's HF model costs seconds and is kept off the library's import path)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import postprocess_generated_text

    class TracedHFLM(HFLM):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.generation_info: dict[str, GenerationInfo] = {}

        def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
            budget = max_length - context.shape[1]
            ends = {t for t in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id) if t is not None}
            for row in out[:, context.shape[1] :].tolist():
                # lm-eval decodes the whole row, then cuts it at the first stop sequence
                full = self.tok_decode(row)
                text = postprocess_generated_text(generation=full, stop=stop, think_end_token=None)
                ended = next((i for i, t in enumerate(row) if t in ends), None)
                stopped = ended is not None or any(s and s in full for s in stop)
                produced = ended if ended is not None else len(row)
                tokens = len(self.tok_encode(text, add_special_tokens=False)) if stopped and ended is None else produced
                self.generation_info[text] = GenerationInfo(truncated=not stopped and len(row) >= budget, tokens=tokens)
            return out

    return TracedHFLM
