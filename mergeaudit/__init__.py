"""mergeaudit: audit merges of RLVR-trained LLM checkpoints.

The library layer: pure Python and torch, no Prefect import anywhere in it. Stream checkpoints
from any store (`store`, `checkpoint`), measure update geometry (`geometry`), merge (`merging`),
score with lm-eval and verifiers (`evaluation`), and keep results in Parquet (`tables`). The
Prefect flows in the repository's `flows/` (installed as `mergeaudit.flows`, with
`mergeaudit.tasks` and `mergeaudit.deployments`) orchestrate these functions; each one can be
called from a REPL. Only `cli` imports them; tests/test_layering.py holds the import rules.
"""

__version__ = "0.1.0"
