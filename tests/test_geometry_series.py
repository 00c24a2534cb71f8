"""The training-step series (issue 15): a run of five checkpoints with known densities, the
steps found under a prefix (locally and on the S3 endpoint), an audit that measures them, and
the watcher's landed checkpoint counted as a new step rather than a new model."""

from __future__ import annotations

import datetime as dt

import pytest
import torch

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint, write_checkpoint
from mergeaudit.config import CheckpointSpec, parse_config, with_models
from mergeaudit.errors import ConfigError
from mergeaudit.geometry import GeometrySettings
from mergeaudit.geometry.series import compute_series, discover_steps, spaced, step_number

SHAPES = {
    "model.layers.0.mlp.up_proj.weight": (40, 50),
    "model.layers.0.self_attn.q_proj.weight": (50, 50),
    "model.layers.0.input_layernorm.weight": (50,),
}
STEPS = (100, 200, 300, 400, 500)
DENSITY = {100: 0.02, 200: 0.05, 300: 0.10, 400: 0.15, 500: 0.20}


def family():
    """Base, five steps whose update masks are nested (step s changes the first DENSITY[s] of
    a fixed order of entries, each by the same amount at every step), and another run that
    changes entries none of the steps touches."""
    g = torch.Generator().manual_seed(1)
    base = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in SHAPES.items()}
    order = {n: torch.randperm(t.numel(), generator=g) for n, t in base.items()}
    steps = {}
    for step in STEPS:
        tensors = {}
        for n, t in base.items():
            flat = t.float().reshape(-1).clone()
            k = round(DENSITY[step] * flat.numel())
            idx = order[n][:k]
            flat[idx] += 0.25
            tensors[n] = flat.reshape(t.shape).to(torch.bfloat16)
        steps[step] = tensors
    other = {}
    for n, t in base.items():
        flat = t.float().reshape(-1).clone()
        idx = order[n][-round(0.1 * flat.numel()) :]
        flat[idx] -= 0.5
        other[n] = flat.reshape(t.shape).to(torch.bfloat16)
    return base, steps, other


NAMES = list(SHAPES)


def expected_sparsity(tensors, step):
    """The unweighted mean over tensors of 1 - changed / numel."""
    tensors = list(tensors)
    return sum(1 - round(DENSITY[step] * t.numel()) / t.numel() for t in tensors) / len(tensors)


def write(uri, tensors):
    return write_checkpoint(uri, tensors.items(), config={"model_type": "llama"})


def changed(a, b):
    return int((a.to(torch.bfloat16) != b.to(torch.bfloat16)).sum())


def test_five_steps_with_known_densities(tmp_path):
    base, steps, other = family()
    for n in base:  # the construction changes every chosen entry in bf16
        for s in STEPS:
            assert changed(base[n], steps[s][n]) == round(DENSITY[s] * base[n].numel())
    base_ck = Checkpoint.open(write(str(tmp_path / "base"), base))
    cks = [(s, Checkpoint.open(write(str(tmp_path / f"step-{s}"), steps[s]))) for s in STEPS]
    other_ck = Checkpoint.open(write(str(tmp_path / "other"), other))
    settings = GeometrySettings(top_k_fraction=0.1)
    rows = compute_series(base_ck, "math", cks[::-1], {"code": other_ck}, kind="rlvr", settings=settings)

    def one(step, against, scope="model", module=None):
        (r,) = [
            r
            for r in rows
            if r["step"] == step and r["against"] == against and r["scope"] == scope and r["module"] == module
        ]
        return r

    for s in STEPS:
        r = one(s, "base")
        assert r["series"] == "math" and r["kind"] == "rlvr" and r["skipped_tensors"] == 0
        assert r["sparsity_bf16"] == pytest.approx(expected_sparsity(base.values(), s), abs=1e-12)
        assert r["changed_bf16"] == sum(round(DENSITY[s] * t.numel()) for t in base.values())
        assert 0 < r["update_rank_ratio"] <= 1 and r["spectral_drift"] > 0
        assert r["model_fingerprint"] == dict(cks)[s].fingerprint
        c = one(s, "model")
        assert c["against_model"] == "code" and c["overlap"] == 0 and c["overlap_of_step"] == 0.0
        mlp = one(s, "base", scope="module", module="mlp")
        assert mlp["sparsity_bf16"] == pytest.approx(expected_sparsity([base[NAMES[0]]], s), abs=1e-12)
    for prev, s in zip(STEPS, STEPS[1:]):
        p = one(s, "previous")
        assert p["against_model"] == f"math@{prev}"
        # only the entries new at this step changed since the previous one
        assert p["changed_bf16"] == sum(
            round(DENSITY[s] * t.numel()) - round(DENSITY[prev] * t.numel()) for t in base.values()
        )
    for s in STEPS[:-1]:
        f = one(s, "final")
        assert f["overlap_of_step"] == 1.0  # nested masks: every entry a step changed, the final changes
        assert f["overlap_of_other"] == pytest.approx(
            sum(round(DENSITY[s] * t.numel()) for t in base.values())
            / sum(round(DENSITY[500] * t.numel()) for t in base.values())
        )
        assert f["overlap_of_step_lift"] > 1
    assert not [r for r in rows if r["step"] == STEPS[0] and r["against"] == "previous"]
    assert not [r for r in rows if r["step"] == STEPS[-1] and r["against"] == "final"]
    # rank grows with the update's density on this family (random sparse updates of growing support)
    ranks = [one(s, "base")["update_rank_ratio"] for s in STEPS]
    assert ranks == sorted(ranks)


def test_a_dtype_mismatch_counts_as_skipped_tensors(tmp_path):
    base, steps, _ = family()
    bad = dict(steps[200])
    bad["model.layers.0.mlp.up_proj.weight"] = bad["model.layers.0.mlp.up_proj.weight"].to(torch.float16)
    base_ck = Checkpoint.open(write(str(tmp_path / "base"), base))
    cks = [
        (100, Checkpoint.open(write(str(tmp_path / "s100"), steps[100]))),
        (200, Checkpoint.open(write(str(tmp_path / "s200"), bad))),
    ]
    rows = compute_series(base_ck, "r", cks, settings=GeometrySettings(spectral=False))
    (r,) = [r for r in rows if r["step"] == 200 and r["against"] == "base" and r["scope"] == "model"]
    assert r["skipped_tensors"] == 1 and r["n_tensors"] == 2


def test_step_numbers_and_spacing():
    assert [step_number(p) for p in ("step-100", "checkpoint-200", "global_step300/actor", "run2/step_7", "final")] == [
        100,
        200,
        300,
        7,
        None,
    ]
    steps = [(i * 10, f"u{i}") for i in range(11)]
    assert spaced(steps, 3) == [(0, "u0"), (50, "u5"), (100, "u10")]
    assert spaced(steps, 20) == steps


def test_discover_steps_under_a_prefix(store_root):
    base, steps, _ = family()
    prefix = store.join(store_root, "runs", "math")
    for s in (100, 300):
        write(store.join(prefix, f"checkpoint-{s}"), steps[s])
    write(store.join(prefix, "final"), steps[500])  # no step number: left out
    half = write(store.join(prefix, "checkpoint-200"), steps[200])
    store.remove(store.join(half, "model.safetensors"))  # incomplete: left out
    found, skipped = discover_steps(prefix)
    assert [s for s, _ in found] == [100, 300]
    assert found[0][1] == store.join(prefix, "checkpoint-100")
    assert len(skipped) == 2 and any("no step number" in line for line in skipped)


def audit_config(tmp_path, prefix, **series):
    base, steps, other = family()
    write(str(tmp_path / "base"), base)
    write(str(tmp_path / "code"), other)
    return parse_config(
        {
            "name": "series",
            "base": {"name": "base", "uri": str(tmp_path / "base")},
            "models": [{"name": "code", "uri": str(tmp_path / "code"), "kind": "rlvr"}],
            "series": [{"name": "math", "kind": "rlvr", "prefix": prefix, **series}],
            "results_uri": str(tmp_path / "results"),
            "geometry": {"spectral": False},
        }
    ), steps


def test_an_audit_measures_the_steps_it_finds_on_s3(tmp_path, s3_bucket):
    from mergeaudit import audit

    prefix = f"{s3_bucket}/runs/math"
    config, steps = audit_config(tmp_path, prefix)
    for s in (100, 200, 300):
        write(store.join(prefix, f"step-{s}"), steps[s])
    records = audit.resolve_checkpoints(config)
    assert sorted(r.name for r in records.values() if r.series == "math") == ["math@100", "math@200", "math@300"]
    geo = audit.compute_geometry(config, records)
    rows = [r for r in geo["geometry_series"] if r["scope"] == "model" and r["against"] == "base"]
    base = family()[0]
    assert [(r["step"], r["sparsity_bf16"]) for r in rows] == [
        (s, pytest.approx(expected_sparsity(base.values(), s))) for s in (100, 200, 300)
    ]
    assert {r["model"] for r in geo["geometry_tensors"]} == {"code"}  # steps are not models of the audit
    roles = {r["name"]: r["role"] for r in audit.checkpoint_rows(config, records)}
    assert roles["math@200"] == "series_step" and roles["code"] == "model"
    # the watcher announces a new step: it joins the series, not the models
    landed = CheckpointSpec(name="step-400", uri=store.join(prefix, "step-400"), kind="rlvr")
    assert with_models(config, [landed]) == config
    write(landed.uri, steps[400])
    assert "math@400" in audit.resolve_checkpoints(config)


def test_series_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="give `steps` or `prefix`"):
        audit_config(tmp_path / "a", str(tmp_path / "runs"), steps=[{"step": 1, "uri": str(tmp_path / "x")}])
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        audit_config(tmp_path / "b", str(tmp_path / "runs"), compare_with=["nope"])
    with pytest.raises(ConfigError, match="contains checkpoint series math"):
        parse_config(
            {
                "base": {"name": "base", "uri": str(tmp_path / "b")},
                "models": [{"name": "m", "uri": str(tmp_path / "m")}],
                "series": [{"name": "math", "prefix": str(tmp_path / "out" / "runs")}],
                "results_uri": str(tmp_path / "out"),
            }
        )


def test_the_report_plots_the_series_and_the_module_types(tmp_path):
    from mergeaudit import audit, report, tables
    from mergeaudit.geometry import compute_geometry

    base, steps, other = family()
    other["model.layers.0.mlp.up_proj.weight"] = other["model.layers.0.mlp.up_proj.weight"].to(torch.float16)
    base_ck = Checkpoint.open(write(str(tmp_path / "base"), base))
    code = Checkpoint.open(write(str(tmp_path / "code"), other))
    cks = [(s, Checkpoint.open(write(str(tmp_path / f"s{s}"), steps[s]))) for s in STEPS[:3]]
    settings = GeometrySettings(top_k_fraction=0.1)
    tensor_rows, pair_rows = compute_geometry(base_ck, {"code": code}, {"code": "rlvr"}, settings)
    results = str(tmp_path / "results")
    tables.write_run(
        results,
        audit.new_run_id(),
        "2026-11-28",
        {
            "geometry_tensors": tensor_rows,
            "geometry_pairs": pair_rows,
            "geometry_series": compute_series(base_ck, "math", cks, {"code": code}, "rlvr", settings),
            "runs": [audit.run_row("series", dt.datetime.now(dt.timezone.utc), "{}")],
        },
    )
    data = report.load_run(results)
    content = report.build_content(data)
    ids = [f.id for f in content.figures]
    assert "plot-series-math" in ids and "plot-modules" in ids
    sections = {title: rows for title, rows, _ in content.sections}
    assert [r["step"] for r in sections["Training-step series"]] == [100, 200, 300]
    assert sections["Training-step series"][1]["overlap_with_final"] == 1.0
    (note,) = sections["Tensors not compared"]
    assert "1 tensor(s) of code not compared (dtype F16 vs base BF16" in note["note"]
    # its one MLP tensor was not compared, so code has no mlp row
    assert {r["module"] for r in sections["Update geometry per module type"]} == {"attention", "norm"}
    html = report.render_html(data, content)
    assert "Training-step series" in html and "plot-series-math" in html


def test_the_run_summary_states_tensors_not_compared(tmp_path):
    from mergeaudit import audit

    config, steps = audit_config(tmp_path, str(tmp_path / "runs"))
    half = dict(family()[2])
    half["model.layers.0.self_attn.q_proj.weight"] = half["model.layers.0.self_attn.q_proj.weight"].to(torch.float16)
    write_checkpoint(str(tmp_path / "code"), half.items(), config={"model_type": "llama"}, overwrite=True)
    write(str(tmp_path / "runs" / "step-1"), steps[100])
    records = audit.resolve_checkpoints(config)
    geo = audit.compute_geometry(config, records)
    (reason,) = [r["reason"] for r in geo["geometry_tensors"] if r["reason"]]
    assert reason == "dtype F16 vs base BF16: not compared"
    outcome = audit.finish_run(config, audit.new_run_id(), dt.datetime.now(dt.timezone.utc), records, geo, [], [])
    assert outcome.notes == [
        "geometry: 1 tensor(s) of code not compared (dtype F16 vs base BF16: not compared): "
        "model.layers.0.self_attn.q_proj.weight"
    ]


def test_series_reuse_the_base_decompositions_of_the_main_pass(tmp_path, monkeypatch):
    import mergeaudit.geometry as geometry_module
    from mergeaudit.geometry import compute_geometry

    base, steps, other = family()
    base_ck = Checkpoint.open(write(str(tmp_path / "base"), base))
    code = Checkpoint.open(write(str(tmp_path / "code"), other))
    cks = [(s, Checkpoint.open(write(str(tmp_path / f"s{s}"), steps[s]))) for s in STEPS[:2]]
    settings = GeometrySettings(top_k_fraction=0.1)
    alone = compute_series(base_ck, "math", cks, {"code": code}, "rlvr", settings)
    shared: dict = {}
    compute_geometry(base_ck, {"code": code}, settings=settings, decompositions=shared)
    assert len(shared) == 2  # the two 2-D tensors
    made = []
    real = geometry_module.decompose
    monkeypatch.setattr(geometry_module, "decompose", lambda *a, **k: made.append(a) or real(*a, **k))
    again = compute_series(base_ck, "math", cks, {"code": code}, "rlvr", settings, shared)
    assert not made and again == alone
