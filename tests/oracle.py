"""An lm-eval LM that answers from a table: it checks metric wiring without a trained model."""

from __future__ import annotations

from lm_eval.api.model import LM


class TableLM(LM):
    """generate_until returns answers[prompt] (or `default`); scoring requests are unsupported."""

    def __init__(self, answers: dict[str, str], default: str = ""):
        super().__init__()
        self.answers = answers
        self.default = default
        self.prompts: list[str] = []

    def generate_until(self, requests):
        out = []
        for req in requests:
            prompt = req.args[0]
            self.prompts.append(prompt)
            out.append(self.answers.get(prompt, self.default))
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError
