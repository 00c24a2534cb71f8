"""An lm-eval LM that answers from a table: it checks metric wiring without a trained model."""

from __future__ import annotations

from collections import defaultdict

from lm_eval.api.model import LM


class TableLM(LM):
    """generate_until answers answers[prompt]; a list of answers is cycled through across the
    repeated samples of a prompt. Scoring requests are unsupported."""

    def __init__(self, answers: dict[str, str | list[str]], default: str = ""):
        super().__init__()
        self.answers = answers
        self.default = default
        self.prompts: list[str] = []
        self._seen: dict[str, int] = defaultdict(int)

    def generate_until(self, requests):
        out = []
        for req in requests:
            prompt = req.args[0]
            self.prompts.append(prompt)
            answer = self.answers.get(prompt, self.default)
            if isinstance(answer, list):
                answer = answer[self._seen[prompt] % len(answer)]
                self._seen[prompt] += 1
            out.append(answer)
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError
