"""Parity with mergekit 0.1.x: the same YAML gives the same tensors, for every deterministic
method both have; and mergekit YAML runs unchanged through `mergeaudit merge`."""

from __future__ import annotations

import pytest
import torch
import yaml

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint, discover, write_checkpoint
from mergeaudit.merging.executor import REPORT_FILE, run_merge
from mergeaudit.merging.mergekit_yaml import plan_from_mergekit
from mergeaudit.toy.models import build_base, sparse_update

mergekit = pytest.importorskip("mergekit")

LAYER_T = [0, 0.5, 0.3, 0.7, 1]


@pytest.fixture(scope="module")
def fp32_family(tmp_path_factory):
    """A tiny Llama base and three sparse fine-tunes, all in fp32 (ties-free magnitudes)."""
    root = str(tmp_path_factory.mktemp("parity"))
    base_uri = build_base(root, layers=3)
    base = Checkpoint.open(base_uri)
    base32 = write_checkpoint(
        store.join(root, "base32"), ((n, t.float()) for n, t in base.iter_tensors()), source=base, dtype=torch.float32
    )
    uris = {"base": base32}
    for i, (name, density) in enumerate([("a", 0.3), ("b", 0.5), ("c", 0.4)]):
        g = torch.Generator().manual_seed(i)
        tensors = (
            (n, sparse_update(n, t.float(), density, i, name) + 1e-4 * torch.randn(t.shape, generator=g))
            for n, t in base.iter_tensors()
        )
        uris[name] = write_checkpoint(store.join(root, name), tensors, source=base, dtype=torch.float32)
    return uris


def configs(u: dict[str, str]) -> dict[str, dict]:
    m = lambda name, **p: {"model": u[name], **({"parameters": p} if p else {})}  # noqa: E731
    return {
        "linear": {"models": [m("a", weight=1.0), m("b", weight=2.0)], "merge_method": "linear"},
        "task_arithmetic": {
            "models": [m("a", weight=0.7), m("b", weight=0.3)],
            "base_model": u["base"],
            "merge_method": "task_arithmetic",
            "parameters": {"lambda": 0.8},
        },
        "ties": {
            "models": [
                m("a", weight=1.0, density=0.5),
                m("b", weight=0.5, density=0.7),
                m("c", weight=1.0, density=[0.3, 0.9]),
            ],
            "base_model": u["base"],
            "merge_method": "ties",
            "parameters": {"normalize": True},
        },
        "breadcrumbs": {
            "models": [m("a", weight=1.0), m("b", weight=1.0)],
            "base_model": u["base"],
            "merge_method": "breadcrumbs",
            "parameters": {"density": 0.8, "gamma": 0.05},
        },
        "breadcrumbs_ties": {
            "models": [m("a", weight=1.0), m("b", weight=0.6)],
            "base_model": u["base"],
            "merge_method": "breadcrumbs_ties",
            "parameters": {"density": 0.7, "gamma": 0.02},
        },
        "slerp": {
            "models": [m("base"), m("a")],
            "base_model": u["base"],
            "merge_method": "slerp",
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": LAYER_T},
                    {"filter": "mlp", "value": LAYER_T[::-1]},
                    {"value": 0.5},
                ]
            },
        },
        "nuslerp": {
            "models": [m("a", weight=1.0), m("b", weight=3.0)],
            "base_model": u["base"],
            "merge_method": "nuslerp",
        },
        "model_stock": {"models": [m("a"), m("b"), m("c")], "base_model": u["base"], "merge_method": "model_stock"},
        "ram": {"models": [m("a"), m("b"), m("c")], "base_model": u["base"], "merge_method": "ram"},
        "ramplus_tl": {
            "models": [m("a"), m("b"), m("c")],
            "base_model": u["base"],
            "merge_method": "ramplus_tl",
            "parameters": {"r": 0.2, "alpha": 0.5},
        },
    }


def run_mergekit(cfg: dict, out: str) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mk_run
    from mergekit.options import MergeOptions

    mk_run(MergeConfiguration.model_validate(cfg), out, MergeOptions(copy_tokenizer=True))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(configs({k: "x" for k in ("base", "a", "b", "c")})))
def test_same_tensors_as_mergekit(fp32_family, tmp_path, method):
    cfg = {**configs(fp32_family)[method], "dtype": "float32"}
    run_mergekit(cfg, str(tmp_path / "mergekit"))
    report = run_merge(plan_from_mergekit(cfg, tmp_path), str(tmp_path / "ours"))
    theirs, ours = Checkpoint.open(str(tmp_path / "mergekit")), Checkpoint.open(str(tmp_path / "ours"))
    assert sorted(ours.keys()) == sorted(theirs.keys())
    worst = 0.0
    for name in ours.keys():
        a, b = ours.get(name), theirs.get(name)
        assert a.dtype == b.dtype == torch.float32
        worst = max(worst, float((a - b).abs().max()))
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"{method} {name}: max diff {float((a - b).abs().max())}"
    assert report["plan"]["method"] == method and report["tensors"]


def test_mergekit_yaml_runs_unchanged_through_the_cli(run_cli, fp32_family, tmp_path):
    cfg = {**configs(fp32_family)["ties"], "dtype": "float32", "out_dtype": "bfloat16", "tokenizer_source": "base"}
    path = tmp_path / "ties.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_cli("merge", str(path), str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-2000:]
    ck = Checkpoint.open(str(tmp_path / "out"))
    assert {ck.spec(n).dtype for n in ck.keys()} == {"BF16"} and ck.config["dtype"] == "bfloat16"
    assert "tokenizer.json" in ck.files and REPORT_FILE in ck.files
    import json

    report = json.loads(store.read_bytes(ck.files[REPORT_FILE].uri))
    assert 0 <= report["erased_fraction"] <= 1
    assert report["inputs"]["models"][0]["fingerprint"]
    densities = {tuple(p["params"]["density"]) for p in report["resolved_params"]}
    assert len(densities) == 3, "the gradient over 3 layers resolves to 3 density settings"


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: c.update(merge_method="tiez"), "unknown merge method 'tiez'"),
        (
            lambda c: c["models"].__setitem__(0, {**c["models"][0], "parameters": {"weight": 1, "density": 1.5}}),
            "density must be in [0, 1]",
        ),
        (lambda c: c.update(slices=[]), "layer slices are not supported"),
        (lambda c: c["models"].append({"model": "meta-llama/Llama-3-8B"}), "hub ids are not downloaded"),
        (
            lambda c: c.update(tokenizer={"source": "union", "tokens": {"<s>": {"source": c["base_model"]}}}),
            "tokenizer.tokens",
        ),
        (lambda c: c.pop("base_model"), "ties needs a base"),
    ],
)
def test_invalid_configs_exit_2_and_leave_nothing(run_cli, fp32_family, tmp_path, mutate, message):
    cfg = configs(fp32_family)["ties"]
    cfg["parameters"] = dict(cfg["parameters"])
    cfg["models"] = list(cfg["models"])
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_cli("merge", str(path), str(tmp_path / "out"))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not discover(str(tmp_path / "out")) and not (tmp_path / "out").exists()


def test_dare_masks_regenerate_alone_and_ignore_processing_order(fp32_family, tmp_path):
    from mergeaudit.merging import REGISTRY, TensorSlot
    from mergeaudit.merging.executor import prepare

    cfg = {
        "models": [
            {"model": fp32_family["a"], "parameters": {"weight": 1.0}},
            {"model": fp32_family["b"], "parameters": {"weight": 1.0}},
        ],
        "base_model": fp32_family["base"],
        "merge_method": "dare_ties",
        "dtype": "float32",
        "parameters": {"density": 0.4},
    }
    plan = plan_from_mergekit(cfg, tmp_path, seed=11)
    merged = dict(prepare(plan).stream())
    swapped = plan.model_copy(update={"models": plan.models[::-1], "model_parameters": plan.model_parameters[::-1]})
    assert all(torch.equal(merged[n], t) for n, t in prepare(swapped).stream())
    name = "model.layers.1.mlp.down_proj.weight"
    prepared = prepare(plan)
    base = prepared.base.get(name).float()
    slot = TensorSlot(
        name,
        base,
        tuple(m.get(name).float() for m in prepared.models),
        tuple(m.id for m in plan.models),
        None,
        11,
        random_keys=tuple(m.fingerprint for m in prepared.models),
    )
    assert torch.equal(REGISTRY.get("dare_ties").fn(slot, prepared.params[name]), merged[name])
    other_seed = dict(prepare(plan.model_copy(update={"seed": 12})).stream())
    assert not torch.equal(other_seed[name], merged[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "sar"])
def test_cuda_merge_matches_cpu(fp32_family, tmp_path, method):
    from mergeaudit.merging.executor import MergePlan, ModelRef, prepare

    models = [ModelRef(id=n, uri=fp32_family[n]) for n in ("a", "b")]
    params = {"density": 0.5} if method != "sar" else {"sensitivity": "magnitude"}
    plan = MergePlan(
        method=method, base=ModelRef(id="base", uri=fp32_family["base"]), models=models, parameters=params, seed=5
    )
    cpu = dict(prepare(plan).stream())
    for name, t in prepare(plan.model_copy(update={"device": "cuda"})).stream():
        assert torch.allclose(t, cpu[name], rtol=1e-5, atol=1e-6), name


def test_merge_reads_and_writes_s3(run_cli, s3_bucket, tmp_path):
    from mergeaudit.toy import build_toy_family

    family = build_toy_family(s3_bucket + "/ckpts", variants={"x": 0.1, "y": 0.2})
    cfg = {
        "merge_method": "dare_ties",
        "base_model": family.base,
        "parameters": {"density": 0.5, "weight": 1.0},
        "models": [{"model": u} for u in family.variants.values()],
    }
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_cli("merge", str(path), s3_bucket + "/merged", "--seed", "3")
    assert out.returncode == 0, out.stderr[-2000:]
    merged = Checkpoint.open(s3_bucket + "/merged")
    assert merged.keys() == Checkpoint.open(family.base).keys() and REPORT_FILE in merged.files
