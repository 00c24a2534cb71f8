"""Output vocabularies for merges whose inputs' tokenizers differ, as mergekit 0.1.5 builds them.

A merge with a vocabulary plan (mergekit's `tokenizer_source: base | union | <model>`, or its
`tokenizer:` block with `source` and `pad_to_multiple_of`) first builds an output tokenizer,
then re-indexes every input's vocabulary-indexed tensors (input embeddings and the LM head,
vocabulary on axis 0) onto it before the merge method sees them, the base included:

- base: the base's tokenizer (without a base_model, the first model's), stripped of tokens
  whose id is >= the base config's vocab_size (BPE tokenizers only, as in mergekit);
- union: the stripped base tokenizer plus, in input order (base, then the models), every token
  of another model's tokenizer whose id is < that model's vocab_size, then every added token
  (with its settings; the first model's settings win);
- a model id: that model's tokenizer, as saved.

The output has len(tokenizer) rows (rounded up to `pad_to_multiple_of`), and the output config's
`vocab_size` says so: a Qwen-style checkpoint with 128 padded rows and a 100-token tokenizer
comes out with 100 rows. For each input and output token, the row is the input's own row for
that token when its tokenizer has it (below its vocab_size); otherwise a default: the one
model that has the token (donor), else the base's row when the base has it, else the average
over the inputs that have it (summed in input order in the promoted dtype, then divided),
else zeros. Padding rows are the mean of the token rows. Rows are gathered in the inputs'
promoted dtype after the cast to the compute `dtype` (mergekit's GatherTensors, then
PermutedVocabulary). When no input changes (every tokenizer maps every output token to the
same id and every tensor already has the output's rows) nothing is gathered; the output
tokenizer files are copied from their source unless the tokenizer was rebuilt (stripped or
extended), when they are its `save_pretrained` files.

Tokenizers load locally with transformers.AutoTokenizer (use_fast=True, trust_remote_code=False,
local_files_only=True; remote checkpoints' tokenizer files are copied to a temporary folder
first; transformers is imported only then); an input without tokenizer files is taken to
share the base's, as mergekit does, but one whose tokenizer fails to load is refused (mergekit
would assume the base's).

Not supported, refused with ConfigError before any tensor is read: mergekit's `tokens:`
overrides (per-token embedding sources, `force`), a tokenizer source that is not one of the
merged models, output tokenizers whose ids are not exactly 0..n-1, an input tokenizer that
holds an output token at an id >= its vocab_size (mergekit fails on it with a KeyError), and
stripping non-BPE tokenizers. Differences from mergekit: where several non-base models add
tokens, mergekit's union order follows Python set order and the tokenizers library's hash-map
order (it varies from run to run); ours is input order and, within a tokenizer, id order (the
same tokens, and the same order whenever mergekit's is deterministic: added tokens from one
model). Vocabulary-indexed tensors are recognised by name (VOCAB_TENSORS, the names mergekit's
architecture files give a vocabulary_axis), not from an architecture definition.

    vocab = build_vocabulary(VocabularyPlan(source="union"), "base", ["base", "a"], checkpoints)
    rows = vocab.gather({"base": embed_base, "a": embed_a})  # id -> tensor on the output vocabulary
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic
import torch

from mergeaudit import store
from mergeaudit.checkpoint import CONFIG_FILE, TOKENIZER_FILES, Checkpoint
from mergeaudit.errors import ConfigError, MergeAuditError

# Top-level tensor names mergekit's architecture definitions index by vocabulary (axis 0).
VOCAB_TENSORS = frozenset(
    {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "lm_head.bias",
        "transformer.wte.weight",
        "model.language_model.embed_tokens.weight",
        "transformer.word_embeddings.weight",
        "transformer.embedding.word_embeddings.weight",
        "transformer.output_layer.weight",
        "transformer.embd.wte.weight",
        "model.tok_embeddings.weight",
        "output.weight",
        "embed_out.weight",
        "gpt_neox.embed_in.weight",
        "embed_tokens.weight",
        "backbone.embeddings.weight",
    }
)
TOKENIZER_LOAD_FILES = (*TOKENIZER_FILES, "added_tokens.json", CONFIG_FILE)
GENERATION_CONFIG = "generation_config.json"


class VocabularyPlan(pydantic.BaseModel):
    """mergekit's tokenizer settings: `source` is "base", "union" or a merged model's id."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    source: str
    pad_to_multiple_of: int | None = pydantic.Field(default=None, ge=1)


def promoted_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The dtype torch promotes the tensors' dtypes to (mergekit computes a group in it)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def is_vocabulary_tensor(name: str) -> bool:
    return name in VOCAB_TENSORS


def config_vocab_size(config: Mapping[str, Any]) -> int | None:
    """The config's vocab_size (top level, else text_config's), None when absent."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, Mapping) and isinstance(cfg.get("vocab_size"), int):
            return cfg["vocab_size"]
    return None


def with_vocab_size(config: dict[str, Any], size: int) -> dict[str, Any]:
    """A copy of config whose vocab_size (where config_vocab_size found it) is size."""
    out = dict(config)
    if "vocab_size" not in out and isinstance(out.get("text_config"), Mapping) and "vocab_size" in out["text_config"]:
        out["text_config"] = {**out["text_config"], "vocab_size": size}
    else:
        out["vocab_size"] = size
    return out


def has_tokenizer(ck: Checkpoint) -> bool:
    return "tokenizer.json" in ck.files or "tokenizer_config.json" in ck.files or "tokenizer.model" in ck.files


def load_tokenizer(ck: Checkpoint) -> Any:
    """The checkpoint's tokenizer, loaded locally (no hub, no remote code)."""
    import transformers

    loc = store.locate(ck.uri)
    try:
        if loc.is_local:
            return transformers.AutoTokenizer.from_pretrained(
                loc.path, use_fast=True, trust_remote_code=False, local_files_only=True
            )
        with tempfile.TemporaryDirectory(prefix="mergeaudit-tok-") as tmp:
            for name in TOKENIZER_LOAD_FILES:
                if name in ck.files:
                    with open(os.path.join(tmp, name), "wb") as fp:
                        fp.write(store.read_bytes(ck.files[name].uri))
            return transformers.AutoTokenizer.from_pretrained(
                tmp, use_fast=True, trust_remote_code=False, local_files_only=True
            )
    except MergeAuditError:
        raise
    except Exception as exc:  # transformers and tokenizers raise many kinds for a bad tokenizer
        raise ConfigError(
            f"the tokenizer of {ck.uri} cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''})"
        ) from exc


def strip_tokenizer(tokenizer: Any, vocab_size: int, where: str) -> tuple[Any, bool]:
    """(tokenizer without tokens whose id is >= vocab_size, whether any were removed); BPE only."""
    import tokenizers

    unused = {tok for tok, idx in tokenizer.get_vocab().items() if idx >= vocab_size}
    if not unused:
        return tokenizer, False
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{where}: its tokenizer has tokens beyond vocab_size {vocab_size} and no fast tokenizer to strip them from"
        )
    spec = json.loads(tokenizer._tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ConfigError(
            f"{where}: its tokenizer has tokens beyond vocab_size {vocab_size}; stripping them "
            f"is supported for BPE tokenizers only, not {spec['model']['type']}"
        )
    spec["added_tokens"] = [e for e in spec["added_tokens"] if e["id"] < vocab_size]
    for tok in unused:
        spec["model"]["vocab"].pop(tok, None)

    def keep(merge: Any) -> bool:
        if isinstance(merge, str) and merge.count(" ") == 1:
            parts = merge.split(" ")
        elif isinstance(merge, list):
            parts = merge
        else:
            raise ConfigError(f"{where}: unexpected BPE merge {merge!r} in its tokenizer")
        return not any(p in unused for p in parts)

    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return tokenizer, True


def union_tokenizer(base_tok: Any, toks: Mapping[str, Any], sizes: Mapping[str, int | None]) -> Any:
    """mergekit's union: the base tokenizer plus other inputs' tokens, then all added tokens."""
    import transformers

    new_tokens: dict[str, None] = {}
    added: dict[str, Any] = {}
    for key, tok in toks.items():
        size = sizes.get(key) or tok.vocab_size
        for t, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < size:
                new_tokens.setdefault(t)
        for idx, info in sorted(tok.added_tokens_decoder.items()):
            if idx < size:
                added.setdefault(info.content, info)
    # a reloaded copy: adding tokens must not change the base tokenizer
    with tempfile.TemporaryDirectory(prefix="mergeaudit-tok-") as tmp:
        base_tok.save_pretrained(tmp, legacy_format=False, safe_serialization=True)
        out = transformers.AutoTokenizer.from_pretrained(
            tmp, use_fast=True, trust_remote_code=False, local_files_only=True
        )
    base_vocab = base_tok.get_vocab()
    for t in new_tokens:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class Vocabulary:
    """An output vocabulary and how each input's rows map onto it.

    rows[id][t] is the input's row for output token t, -1 when its tokenizer lacks the token;
    `defaults` names, for every token some input lacks, where those inputs' row comes from."""

    plan: VocabularyPlan
    tokenizer: Any
    n_tokens: int
    size: int
    rows: dict[str, torch.Tensor]
    order: list[str]
    donor: dict[int, str]  # token -> the input whose row the others take (donor or base)
    average: dict[int, list[str]]  # token -> the inputs averaged, in input order
    zero: list[int]
    rebuilt: bool  # the tokenizer differs from its source's files
    file_source: str  # input id whose tokenizer files are copied when not rebuilt

    @property
    def identity(self) -> bool:
        """True when every input's tokenizer already has the output's token ids (and no padding)."""
        ar = torch.arange(self.n_tokens)
        return self.size == self.n_tokens and all(torch.equal(r, ar) for r in self.rows.values())

    def check_rows(self, key: str, name: str, shape: tuple[int, ...]) -> str | None:
        """A problem when input `key`'s tensor `name` lacks rows the vocabulary reads."""
        need = int(self.rows[key].max()) + 1 if self.n_tokens else 0
        if not shape or shape[0] < need:
            return f"{name} of {key} has {shape[0] if shape else 0} rows, but its tokenizer uses ids up to {need - 1}"
        return None

    def gather(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every input's tensor re-indexed onto the output vocabulary (axis 0), in the inputs'
        promoted dtype, with mergekit's default rows for tokens an input lacks."""
        keys = [k for k in self.order if k in tensors]
        dtype = promoted_dtype([tensors[k] for k in keys])
        first = tensors[keys[0]]
        shape, device = tuple(first.shape[1:]), first.device
        missing = sorted(set(self.donor) | set(self.average) | set(self.zero))
        pos = {t: i for i, t in enumerate(missing)}
        default = torch.zeros((len(missing), *shape), dtype=dtype, device=device)
        for t, src in self.donor.items():
            default[pos[t]] = tensors[src][int(self.rows[src][t])]
        avg = sorted(self.average)
        if avg:
            # mergekit: zeros + each present input's row in input order, then / count
            acc = torch.zeros((len(avg), *shape), dtype=dtype, device=device)
            ids = torch.tensor(avg)
            for k in keys:
                src_rows = self.rows[k][ids]
                sel = (src_rows >= 0).nonzero().flatten()
                if len(sel):
                    acc[sel] = acc[sel] + tensors[k][src_rows[sel].to(device)]
            counts = torch.tensor([len(self.average[t]) for t in avg])
            for c in counts.unique().tolist():
                sel = (counts == c).nonzero().flatten()
                acc[sel] = acc[sel] / c
            default[torch.tensor([pos[t] for t in avg])] = acc
        out = {}
        for k in keys:
            r = self.rows[k].to(device)
            present = (r >= 0).nonzero().flatten()
            absent = (r < 0).nonzero().flatten()
            new = torch.zeros((self.size, *shape), dtype=dtype, device=device)
            new[present] = tensors[k][r[present]].to(dtype)
            if len(absent):
                new[absent] = default[torch.tensor([pos[int(t)] for t in absent], device=device)]
            if self.size > self.n_tokens:
                # padding rows: the mean token row (https://nlp.stanford.edu/~johnhew/vocab-expansion.html)
                new[self.n_tokens :] = torch.mean(new[: self.n_tokens], dim=0)
            out[k] = new
        return out

    def report(self, changed: bool) -> dict[str, Any]:
        """For the merge report: `changed` says whether any input's rows were re-indexed."""
        return {
            "source": self.plan.source,
            "tokens": self.n_tokens,
            "rows": self.size,
            "rows_reindexed": changed,
            "tokenizer_rebuilt": self.rebuilt,
            "missing_tokens": {k: int((r < 0).sum()) for k, r in self.rows.items()},
            "defaults": {"donor_or_base": len(self.donor), "average": len(self.average), "zero": len(self.zero)},
        }


def build_vocabulary(
    plan: VocabularyPlan, base: str | None, order: Sequence[str], checkpoints: Mapping[str, Checkpoint]
) -> Vocabulary:
    """The output vocabulary and every input's rows on it; `order` lists the distinct input ids
    in mergekit's input order (the models as listed), `base` the base_model's id or None."""
    if plan.source not in ("base", "union") and plan.source not in checkpoints:
        raise ConfigError(f"tokenizer source {plan.source!r} is not one of the merged models")
    ref = base if base is not None else order[0]
    if not has_tokenizer(checkpoints[ref]):
        raise ConfigError(f"{ref} has no tokenizer files; a vocabulary ({plan.source}) is built from them")
    sizes = {k: config_vocab_size(ck.config) for k, ck in checkpoints.items()}
    base_tok = load_tokenizer(checkpoints[ref])
    base_tok, stripped = strip_tokenizer(base_tok, sizes[ref] or len(base_tok.get_vocab()), ref)
    toks = {ref: base_tok}
    for k in order:
        if k != ref and has_tokenizer(checkpoints[k]):
            toks[k] = load_tokenizer(checkpoints[k])
    file_source = ref
    if plan.source == "base":
        out, rebuilt = base_tok, stripped
    elif plan.source == "union":
        out = union_tokenizer(base_tok, toks, sizes)
        rebuilt = stripped or out.get_vocab() != base_tok.get_vocab()
    else:
        if not has_tokenizer(checkpoints[plan.source]):
            raise ConfigError(f"tokenizer source {plan.source!r} has no tokenizer files")
        # as saved: mergekit strips only the base tokenizer it merges with, not a source
        out, rebuilt, file_source = load_tokenizer(checkpoints[plan.source]), False, plan.source
    vocab = out.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise ConfigError(f"the output tokenizer ({plan.source}) does not number its {n} tokens 0..{n - 1}")
    size = n
    if plan.pad_to_multiple_of and n % plan.pad_to_multiple_of:
        size = (n // plan.pad_to_multiple_of + 1) * plan.pad_to_multiple_of
    rows: dict[str, torch.Tensor] = {}
    problems = []
    for k in order:
        own = toks.get(k, base_tok).get_vocab()
        limit = sizes[k] if sizes[k] is not None else len(own)
        r = torch.full((n,), -1, dtype=torch.long)
        beyond = []
        for tok, new_id in vocab.items():
            old = own.get(tok)
            if old is None:
                continue
            if old >= limit:
                beyond.append(tok)
            else:
                r[new_id] = old
        if beyond:
            problems.append(
                f"{k}: its tokenizer holds {len(beyond)} output tokens at ids >= its vocab_size {limit} "
                f"(e.g. {beyond[0]!r}); mergekit 0.1.5 fails on them too"
            )
        rows[k] = r
    if problems:
        raise ConfigError("the vocabulary cannot be built: " + "; ".join(problems))
    donor: dict[int, str] = {}
    average: dict[int, list[str]] = {}
    zero: list[int] = []
    present = torch.stack([rows[k] >= 0 for k in order])  # inputs x tokens
    for t in (~present.all(0)).nonzero().flatten().tolist():
        have = [k for k, p in zip(order, present[:, t].tolist()) if p]
        if len(have) == 1:
            donor[t] = have[0]
        elif not have:
            zero.append(t)
        elif base is not None and base in have:
            donor[t] = base
        else:
            average[t] = have
    return Vocabulary(plan, out, n, size, rows, list(order), donor, average, zero, rebuilt, file_source)


def tokenizer_files(vocab: Vocabulary, source: Checkpoint) -> dict[str, bytes]:
    """The output tokenizer's files (save_pretrained) plus the source's generation config."""
    files = {}
    with tempfile.TemporaryDirectory(prefix="mergeaudit-tok-") as tmp:
        vocab.tokenizer.save_pretrained(tmp, safe_serialization=True)
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                with open(path, "rb") as fp:
                    files[name] = fp.read()
    if GENERATION_CONFIG in source.files and GENERATION_CONFIG not in files:
        files[GENERATION_CONFIG] = store.read_bytes(source.files[GENERATION_CONFIG].uri)
    return files
