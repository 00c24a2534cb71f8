"""Parity with mergekit 0.1.5 across dtypes (issue 16): bf16 and fp16 checkpoints merged with
every compute dtype mergekit accepts (`dtype` bfloat16, float16, float32, float64, or none:
promoted per tensor), mixed input dtypes, a linear merge whose base_model the models do not
list, and configs mergekit merges that we used to refuse. mergekit runs in the same test run on
the same files; the tensors must be the same names, shapes and dtypes and bit-identical
(slerp in fp32 within 1e-5 relative: mergekit computes its coefficients in fp32 chunks)."""

from __future__ import annotations

import pytest
import torch

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint, write_checkpoint
from mergeaudit.merging.executor import run_merge
from mergeaudit.merging.mergekit_yaml import plan_from_mergekit
from mergeaudit.toy.models import build_base, sparse_update
from tests.test_mergekit_parity import configs, run_mergekit

pytest.importorskip("mergekit")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def family(root: str, dtypes: dict[str, torch.dtype]) -> dict[str, str]:
    """A tiny Llama base and sparse fine-tunes stored in the given dtypes (bf16/fp16 inputs make
    many equal magnitudes, so top-k thresholds fall inside ties)."""
    base = Checkpoint.open(build_base(root, layers=3))
    uris = {}
    for i, (name, dtype) in enumerate(dtypes.items()):
        density = {"base": 0.0, "a": 0.3, "b": 0.5, "c": 0.4}[name]
        tensors = (
            (n, (sparse_update(n, t.to(dtype), density, i, name) if density else t).to(dtype))
            for n, t in base.iter_tensors()
        )
        uris[name] = write_checkpoint(store.join(root, f"ck-{name}"), tensors, source=base, dtype=dtype)
    return uris


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    return family(str(tmp_path_factory.mktemp("bf16")), dict.fromkeys(("base", "a", "b", "c"), torch.bfloat16))


@pytest.fixture(scope="module")
def fp16_family(tmp_path_factory):
    return family(str(tmp_path_factory.mktemp("fp16")), dict.fromkeys(("base", "a", "b", "c"), torch.float16))


@pytest.fixture(scope="module")
def mixed_family(tmp_path_factory):
    return family(
        str(tmp_path_factory.mktemp("mixed")),
        {"base": torch.bfloat16, "a": torch.float16, "b": torch.float32, "c": torch.bfloat16},
    )


def assert_same_as_mergekit(cfg: dict, tmp_path, rel: float = 0.0) -> None:
    run_mergekit(cfg, str(tmp_path / "mergekit"))
    run_merge(plan_from_mergekit(cfg, tmp_path), str(tmp_path / "ours"))
    theirs, ours = Checkpoint.open(str(tmp_path / "mergekit")), Checkpoint.open(str(tmp_path / "ours"))
    assert sorted(ours.keys()) == sorted(theirs.keys())
    if cfg.get("base_model") or cfg.get("dtype"):  # without either, mergekit copies the config of an
        # arbitrary input (the first of a set of paths); we copy the first model's
        assert ours.config.get("dtype", ours.config.get("torch_dtype")) == theirs.config.get(
            "dtype", theirs.config.get("torch_dtype")
        )
    for name in theirs.keys():
        a, b = ours.get(name), theirs.get(name)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        if rel:
            assert torch.allclose(a.double(), b.double(), rtol=rel, atol=0), name
        else:
            off = int((a != b).sum())
            worst = float((a.double() - b.double()).abs().max())
            assert off == 0, f"{name}: {off} of {a.numel()} entries differ (max {worst:.3g})"


METHODS = list(configs({k: "x" for k in ("base", "a", "b", "c")}))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64", None])
@pytest.mark.parametrize("method", METHODS)
def test_bf16_checkpoints_in_every_compute_dtype(bf16_family, tmp_path, method, dtype):
    cfg = {**configs(bf16_family)[method], **({"dtype": dtype} if dtype else {})}
    assert_same_as_mergekit(cfg, tmp_path, rel=1e-5 if (method, dtype) == ("slerp", "float32") else 0.0)


@pytest.mark.parametrize("dtype", ["bfloat16", None])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs_ties", "model_stock"])
def test_fp16_checkpoints(fp16_family, tmp_path, method, dtype):
    assert_same_as_mergekit({**configs(fp16_family)[method], **({"dtype": dtype} if dtype else {})}, tmp_path)


@pytest.mark.parametrize("method", ["linear", "ties", "task_arithmetic"])
def test_mixed_input_dtypes_promote_like_mergekit(mixed_family, tmp_path, method):
    """bf16 base, fp16 and fp32 fine-tunes, no `dtype`: each tensor computes (and is written) in
    the promoted dtype, fp32 here."""
    assert_same_as_mergekit(configs(mixed_family)[method], tmp_path)
    assert {
        Checkpoint.open(str(tmp_path / "ours")).spec(n).dtype for n in Checkpoint.open(str(tmp_path / "ours")).keys()
    } == {"F32"}


def m(uri: str, **params) -> dict:
    return {"model": uri, **({"parameters": params} if params else {})}


def test_float64_compute(bf16_family, tmp_path):
    u = bf16_family
    assert_same_as_mergekit(
        {"models": [m(u["a"], weight=0.3), m(u["b"], weight=0.7)], "merge_method": "linear", "dtype": "float64"},
        tmp_path,
    )


def test_linear_merges_a_base_model_the_models_do_not_list(bf16_family, tmp_path):
    u = bf16_family
    assert_same_as_mergekit(
        {
            "models": [m(u["a"], weight=0.3), m(u["b"], weight=0.7)],
            "base_model": u["base"],
            "merge_method": "linear",
            "parameters": {"weight": 0.5},
            "dtype": "float32",
        },
        tmp_path,
    )


@pytest.mark.parametrize("case", ["negative_weight_normalized", "density_gradient_from_zero"])
def test_configs_mergekit_merges_are_merged(bf16_family, tmp_path, case):
    u = bf16_family
    if case == "negative_weight_normalized":
        models = [m(u["a"], weight=-0.5, density=0.5), m(u["b"], weight=1.0, density=0.5)]
        params = {"normalize": True}
    else:
        models = [m(u["a"], weight=1.0, density=[0.0, 0.5]), m(u["b"], weight=1.0, density=0.5)]
        params = {}
    assert_same_as_mergekit(
        {"models": models, "base_model": u["base"], "merge_method": "ties", "parameters": params, "dtype": "bfloat16"},
        tmp_path,
    )


def qwen2_family(root: str, tied: bool = True) -> dict[str, str]:
    """A tiny Qwen2 (tied embeddings) whose fine-tune `a` was saved with its own lm_head.weight
    (as RL frameworks save it) while `b` and the base tie it."""
    import transformers

    from mergeaudit.toy.tokenizer import build_tokenizer

    cfg = transformers.Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(root + "/base")
    build_tokenizer().save_pretrained(root + "/base")
    base = Checkpoint.open(root + "/base")
    uris = {"base": root + "/base"}
    for i, name in enumerate(("a", "b")):
        tensors = {n: sparse_update(n, t, 0.3, i, name) for n, t in base.iter_tensors()}
        if name == "a":
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        uris[name] = write_checkpoint(store.join(root, name), tensors.items(), source=base)
    return uris


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_a_tied_base_merges_with_a_fine_tune_that_saved_its_head(tmp_path, method):
    u = qwen2_family(str(tmp_path / "family"))
    assert "lm_head.weight" not in Checkpoint.open(u["base"]).keys()
    cfg = {
        "ties": {
            "models": [m(u["a"], weight=0.7, density=0.5), m(u["b"], weight=0.4, density=0.5)],
            "base_model": u["base"],
            "merge_method": "ties",
            "dtype": "bfloat16",
        },
        "linear": {
            "models": [m(u["a"], weight=0.3), m(u["b"], weight=0.7)],
            "merge_method": "linear",
            "dtype": "float32",
            "out_dtype": "bfloat16",
        },
    }[method]
    assert_same_as_mergekit(cfg, tmp_path)
    assert "lm_head.weight" in Checkpoint.open(str(tmp_path / "ours")).keys()


ARCHS = {  # tiny configs of the layouts users bring; head_dim for Gemma3's explicit one
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False, "pad_token_id": 0}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "tie_word_embeddings": True}),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_family(request, tmp_path_factory):
    import transformers

    cls, extra = ARCHS[request.param]
    cfg = getattr(transformers, cls)(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **extra,
    )
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(root / "base")
    base = Checkpoint.open(str(root / "base"))
    uris = {"base": str(root / "base")}
    for i, name in enumerate(("a", "b")):
        uris[name] = write_checkpoint(
            str(root / name), ((n, sparse_update(n, t, 0.3, i, name)) for n, t in base.iter_tensors()), source=base
        )
    return uris


@pytest.mark.parametrize("method", ["ties", "linear", "slerp"])
def test_other_architectures(arch_family, tmp_path, method):
    u = arch_family
    cfg = {
        "ties": {
            "models": [m(u["a"], weight=0.7, density=0.5), m(u["b"], weight=0.4, density=[0.3, 0.8])],
            "base_model": u["base"],
            "merge_method": "ties",
            "dtype": "bfloat16",
        },
        "linear": {
            "models": [m(u["a"], weight=0.3), m(u["b"], weight=0.7)],
            "merge_method": "linear",
            "dtype": "float32",
            "out_dtype": "bfloat16",
        },
        "slerp": {
            "models": [m(u["base"]), m(u["a"])],
            "base_model": u["base"],
            "merge_method": "slerp",
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
            "dtype": "bfloat16",
        },
    }[method]
    assert_same_as_mergekit(cfg, tmp_path)


def test_sharded_checkpoints(tmp_path):
    """Inputs in several shards each (an index file), fp16; the output sharded too."""
    base = Checkpoint.open(build_base(str(tmp_path), layers=2))
    uris = {
        "base": write_checkpoint(
            str(tmp_path / "sbase"),
            ((n, t.half()) for n, t in base.iter_tensors()),
            source=base,
            max_shard_bytes=40_000,
        )
    }
    for i, name in enumerate(("a", "b")):
        uris[name] = write_checkpoint(
            str(tmp_path / name),
            ((n, sparse_update(n, t.half(), 0.3, i, name)) for n, t in base.iter_tensors()),
            source=base,
            max_shard_bytes=40_000,
        )
    assert len([f for f in Checkpoint.open(uris["a"]).files if f.endswith(".safetensors")]) > 3
    assert_same_as_mergekit(
        {
            "models": [m(uris["a"], weight=1.0, density=0.4), m(uris["b"], weight=0.5, density=0.6)],
            "base_model": uris["base"],
            "merge_method": "ties",
            "dtype": "float16",
        },
        tmp_path,
    )


@pytest.fixture(scope="module")
def fp32_checkpoints(tmp_path_factory):
    return family(str(tmp_path_factory.mktemp("fp32")), dict.fromkeys(("base", "a", "b", "c"), torch.float32))


@pytest.mark.parametrize("dtype", ["bfloat16", None])
@pytest.mark.parametrize("method", ["linear", "ties", "breadcrumbs_ties", "slerp", "model_stock"])
def test_fp32_checkpoints_in_a_narrower_or_no_compute_dtype(fp32_checkpoints, tmp_path, method, dtype):
    cfg = {**configs(fp32_checkpoints)[method], **({"dtype": dtype} if dtype else {})}
    assert_same_as_mergekit(cfg, tmp_path, rel=1e-5 if (method, dtype) == ("slerp", None) else 0.0)
