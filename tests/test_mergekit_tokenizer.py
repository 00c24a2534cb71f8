"""Vocabulary merging (mergekit's `tokenizer_source: base | union | <model>` and `tokenizer:`)
against mergekit 0.1.5, run in the same test on the same files.

The family is a tiny Qwen2 with 128 padded embedding rows and the 100-token toy tokenizer, whose
fine-tunes have other tokenizers: `a` adds `<think>`, `</think>` and the special `<tool>`, `b`
adds `<think>`, `</think>`, and `c` holds 90 of the base's tokens in another order; `base98` is
the base with vocab_size 98 in its config (mergekit strips its tokenizer's two last tokens).
Every case must give the same tensor names, shapes, dtypes and bits as mergekit, the same vocab_size in
config.json and a tokenizer with the same vocabulary; each also checks the rows it expects, so
a merge that kept the padded 128 rows fails even where mergekit would too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint, write_checkpoint
from mergeaudit.errors import ConfigError
from mergeaudit.merging import vocab as vocab_mod
from mergeaudit.merging.executor import run_merge
from mergeaudit.merging.mergekit_yaml import plan_from_mergekit
from mergeaudit.merging.vocab import Vocabulary, VocabularyPlan
from mergeaudit.toy.models import build_base, sparse_update
from tests.test_mergekit_parity import run_mergekit
from tests.test_mergekit_parity_dtypes import qwen2_family

pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")

EXTRA_A = ["<think>", "</think>"]
DROPPED_BY_C = set("XYZxyz{}[]")


def permuted_tokenizer():
    """The toy tokenizer's special tokens, then its characters reversed, ten of them left out."""
    from tokenizers import Tokenizer, decoders, models

    from mergeaudit.toy.tokenizer import ALPHABET, SPECIAL_TOKENS

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in reversed(ALPHABET):
        if ch not in DROPPED_BY_C:
            vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("vocab"))
    u = qwen2_family(root)
    base = Checkpoint.open(u["base"])
    tensors = ((n, sparse_update(n, t, 0.3, 2, "c")) for n, t in base.iter_tensors())
    u["c"] = write_checkpoint(store.join(root, "c"), tensors, source=base)
    tok_a = transformers.AutoTokenizer.from_pretrained(u["base"])
    tok_a.add_tokens(EXTRA_A)
    tok_a.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    tok_a.save_pretrained(u["a"])
    tok_b = transformers.AutoTokenizer.from_pretrained(u["base"])
    tok_b.add_tokens(EXTRA_A)
    tok_b.save_pretrained(u["b"])
    permuted_tokenizer().save_pretrained(u["c"])
    u["base98"] = shutil.copytree(u["base"], store.join(root, "base98"))
    cfg = json.loads(Path(u["base98"], "config.json").read_text())
    Path(u["base98"], "config.json").write_text(json.dumps({**cfg, "vocab_size": 98}))
    return u


def m(uri: str, **params) -> dict:
    return {"model": uri, **({"parameters": params} if params else {})}


def cases(u: dict[str, str]) -> dict[str, tuple[dict, int]]:
    """name -> (mergekit config, rows the output must have)."""
    ties = {
        "models": [m(u["a"], weight=0.7, density=0.5), m(u["b"], weight=0.4, density=0.5)],
        "base_model": u["base"],
        "merge_method": "ties",
        "dtype": "bfloat16",
    }
    return {
        # the padded case: 128 rows, a 100-token tokenizer
        "base_padded_ties": ({**ties, "tokenizer_source": "base"}, 100),
        "model_a_linear": (
            {
                "models": [m(u["a"], weight=0.3), m(u["b"], weight=0.7)],
                "merge_method": "linear",
                "dtype": "float32",
                "out_dtype": "bfloat16",
                "tokenizer_source": u["a"],
            },
            103,
        ),
        # base lacks all three extra tokens: <tool> from its donor a, <think> averaged over a and b
        "union_ties": ({**ties, "tokenizer_source": "union"}, 103),
        "union_linear_promoted": (
            {
                "models": [m(u["base"], weight=0.2), m(u["a"], weight=0.5), m(u["b"], weight=0.3)],
                "merge_method": "linear",
                "tokenizer_source": "union",
            },
            103,
        ),
        # another token order: every other input is permuted onto c's 90 tokens
        "model_c_permuted_task_arithmetic": (
            {
                "models": [m(u["a"], weight=0.6), m(u["c"], weight=0.5)],
                "base_model": u["base"],
                "merge_method": "task_arithmetic",
                "dtype": "float32",
                "tokenizer_source": u["c"],
            },
            90,
        ),
        # c lacks ten of the base's tokens (the base's rows fill them), a adds three
        "union_with_permuted_c": (
            {
                "models": [m(u["c"], weight=0.5, density=0.6), m(u["a"], weight=0.5, density=0.6)],
                "base_model": u["base"],
                "merge_method": "ties",
                "dtype": "float32",
                "tokenizer_source": "union",
            },
            103,
        ),
        "base_stripped_task_arithmetic": (
            {
                "models": [m(u["a"], weight=0.5), m(u["b"], weight=0.5)],
                "base_model": u["base98"],
                "merge_method": "task_arithmetic",
                "dtype": "float32",
                "tokenizer_source": "base",
            },
            98,
        ),
        "union_padded_to_64": ({**ties, "tokenizer": {"source": "union", "pad_to_multiple_of": 64}}, 128),
        "base_padded_to_48": (
            {**ties, "dtype": "float32", "tokenizer": {"source": "base", "pad_to_multiple_of": 48}},
            144,
        ),
    }


def assert_same_as_mergekit(cfg: dict, tmp_path: Path, rows: int) -> dict:
    run_mergekit(cfg, str(tmp_path / "mergekit"))
    report = run_merge(plan_from_mergekit(cfg, tmp_path), str(tmp_path / "ours"))
    theirs, ours = Checkpoint.open(str(tmp_path / "mergekit")), Checkpoint.open(str(tmp_path / "ours"))
    assert sorted(ours.keys()) == sorted(theirs.keys())
    assert ours.config["vocab_size"] == theirs.config["vocab_size"] == rows
    for name in theirs.keys():
        a, b = ours.get(name), theirs.get(name)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        off = int((a != b).sum())
        assert off == 0, f"{name}: {off} of {a.numel()} entries differ"
    assert ours.get("model.embed_tokens.weight").shape[0] == rows
    tok_ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    tok_theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "mergekit"))
    assert tok_ours.get_vocab() == tok_theirs.get_vocab()
    assert {k: v.content for k, v in tok_ours.added_tokens_decoder.items()} == {
        k: v.content for k, v in tok_theirs.added_tokens_decoder.items()
    }
    return report


@pytest.mark.slow
@pytest.mark.parametrize("case", list(cases({k: k for k in ("base", "a", "b", "c", "base98")})))
def test_same_tensors_vocab_size_and_tokenizer_as_mergekit(family, tmp_path, case):
    cfg, rows = cases(family)[case]
    report = assert_same_as_mergekit(cfg, tmp_path, rows)
    assert report["vocabulary"]["rows"] == rows and report["vocabulary"]["rows_reindexed"]


def test_union_default_rows_follow_mergekits_rules(family, tmp_path):
    """Beyond parity: the rules themselves, on the union_ties inputs (ties keeps the base's row
    where every fine-tune agrees with it, so inspect the gathered inputs, not the merge)."""
    cfg, _ = cases(family)["union_ties"]
    from mergeaudit.merging.executor import prepare

    prepared = prepare(plan_from_mergekit(cfg, tmp_path))
    vocab = prepared.vocab
    out = vocab.tokenizer.get_vocab()
    base, a, b = (Checkpoint.open(family[k]) for k in ("base", "a", "b"))
    ids = {k: p.id for k, p in zip(("a", "b"), prepared.plan.models)} | {"base": prepared.plan.base.id}
    name = "model.embed_tokens.weight"
    tensors = {ids["base"]: base.get(name), ids["a"]: a.get(name), ids["b"]: b.get(name)}
    got = vocab.gather(tensors)
    tok_a = transformers.AutoTokenizer.from_pretrained(family["a"]).get_vocab()
    tool, think = out["<tool>"], out["<think>"]
    assert torch.equal(got[ids["base"]][tool], tensors[ids["a"]][tok_a["<tool>"]])  # donor
    assert torch.equal(got[ids["b"]][tool], tensors[ids["a"]][tok_a["<tool>"]])
    mean = (
        torch.zeros(32, dtype=torch.bfloat16)
        + tensors[ids["a"]][tok_a["<think>"]]
        + tensors[ids["b"]][tok_a["<think>"]]
    ) / 2
    assert torch.equal(got[ids["base"]][think], mean)  # average over the inputs that have it
    assert torch.equal(got[ids["a"]][think], tensors[ids["a"]][tok_a["<think>"]])  # its own row
    assert all(t.shape == (103, 32) for t in got.values())


def test_gather_by_hand():
    """Permutation, donor, base, average, zero and padding rows on tiny tensors."""
    # output tokens 0..4; input rows: base lacks 3 and 4, x lacks 2 and 4, y lacks 4
    rows = {
        "base": torch.tensor([1, 0, 2, -1, -1]),
        "x": torch.tensor([0, 1, -1, 2, -1]),
        "y": torch.tensor([2, 1, 0, 1, -1]),
    }
    v = Vocabulary(
        VocabularyPlan(source="union", pad_to_multiple_of=4),
        None,
        5,
        8,
        rows,
        ["x", "y", "base"],
        donor={2: "base"},
        average={3: ["x", "y"]},
        zero=[4],
        rebuilt=True,
        file_source="base",
    )
    t = {k: torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * i for i, k in enumerate(("base", "x", "y"))}
    got = v.gather(t)
    assert got["base"][:5].tolist() == [[2, 3], [0, 1], [4, 5], [(14 + 22) / 2, (15 + 23) / 2], [0, 0]]
    assert got["x"][2].tolist() == [4, 5] and got["x"][:2].tolist() == [[10, 11], [12, 13]]
    assert got["y"][3].tolist() == [22, 23]  # its own row, not the average
    for k in got:
        assert torch.equal(got[k][5:], got[k][:5].mean(0).expand(3, 2))


@pytest.mark.slow
def test_an_unchanged_vocabulary_reads_and_gathers_nothing(tmp_path, monkeypatch):
    """A Llama whose rows equal its tokenizer: tokenizer_source base changes no tensor and no
    tokenizer file, and gathers nothing; still the same as mergekit."""
    root = str(tmp_path / "llama")
    base = Checkpoint.open(build_base(root, layers=2))
    uris = {"base": base.uri}
    for i, name in enumerate(("a", "b")):
        uris[name] = write_checkpoint(
            store.join(root, name),
            ((n, sparse_update(n, t, 0.3, i, name)) for n, t in base.iter_tensors()),
            source=base,
        )

    def refuse(*_a, **_k):
        raise AssertionError("an unchanged vocabulary must not be gathered")

    monkeypatch.setattr(Vocabulary, "gather", refuse)
    cfg = {
        "models": [m(uris["a"], weight=0.6), m(uris["b"], weight=0.4)],
        "base_model": uris["base"],
        "merge_method": "task_arithmetic",
        "dtype": "bfloat16",
        "tokenizer_source": "base",
    }
    report = assert_same_as_mergekit(cfg, tmp_path, 100)
    assert not report["vocabulary"]["rows_reindexed"] and not report["vocabulary"]["tokenizer_rebuilt"]
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == (Path(base.uri) / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda c, u: c.update(tokenizer={"source": "union", "tokens": {"<think>": {"source": u["a"]}}}),
            "tokenizer.tokens (per-token embedding overrides) is not supported",
        ),
        (lambda c, u: c.update(tokenizer_source="union", tokenizer={"source": "base"}), "cannot both be given"),
        (lambda c, u: c.update(tokenizer_source="/elsewhere"), "is not one of the models"),
        (lambda c, u: c.update(tokenizer={"source": "base", "pad_to_multiple_of": 0}), "positive integer"),
        (lambda c, u: c.update(tokenizer={"source": "base", "pad": 8}), "unknown keys pad"),
    ],
)
def test_unsupported_tokenizer_settings_are_refused(family, tmp_path, mutate, message):
    cfg = dict(cases(family)["union_ties"][0])
    cfg.pop("tokenizer_source")
    mutate(cfg, family)
    with pytest.raises(ConfigError, match="invalid mergekit config") as exc:
        plan_from_mergekit(cfg, tmp_path)
    assert message in str(exc.value)


def test_a_source_without_tokenizer_files_is_refused_before_reading(family, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    src = Checkpoint.open(family["b"])
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes(Path(src.files[name].uri).read_bytes())
    cfg = {
        "models": [m(family["a"], weight=0.5), m(str(bare), weight=0.5)],
        "merge_method": "linear",
        "tokenizer_source": str(bare),
    }
    with pytest.raises(ConfigError, match="has no tokenizer files"):
        run_merge(plan_from_mergekit(cfg, tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert vocab_mod.has_tokenizer(Checkpoint.open(family["a"]))


def test_union_on_s3_matches_the_local_merge(family, tmp_path, s3_bucket):
    """Tokenizers of remote checkpoints load from a local copy of their files; the rebuilt
    tokenizer is published with the checkpoint."""
    remote = {}
    for key in ("base", "a", "b"):
        remote[key] = f"{s3_bucket}/in/{key}"
        for name, info in store.list_files(family[key]).items():
            store.write_bytes(store.join(remote[key], name), Path(info.uri).read_bytes())
    cfg, rows = cases(family)["union_ties"]
    local = run_merge(plan_from_mergekit(cfg, tmp_path), str(tmp_path / "local"))
    cfg_s3, _ = cases({**family, **remote})["union_ties"]
    report = run_merge(plan_from_mergekit(cfg_s3, tmp_path), f"{s3_bucket}/merged")
    ours, theirs = Checkpoint.open(f"{s3_bucket}/merged"), Checkpoint.open(str(tmp_path / "local"))
    assert report["vocabulary"]["defaults"] == local["vocabulary"]["defaults"] and ours.config["vocab_size"] == rows
    assert all(torch.equal(ours.get(n), theirs.get(n)) for n in theirs.keys())
    assert "tokenizer.json" in ours.files
    assert json.loads(store.read_bytes(ours.files["tokenizer.json"].uri)) == json.loads(
        (tmp_path / "local" / "tokenizer.json").read_text()
    )
