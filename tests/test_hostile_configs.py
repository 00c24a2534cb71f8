"""Bad numbers and bombs in configs are refused before any work, in one line.

YAML bombs run in a child process capped at 2.5 GB of address space and 60 s, so a loader
that does expand them fails the test without taking the machine down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mergeaudit.checkpoint import write_checkpoint
from mergeaudit.config import load_config, parse_config
from mergeaudit.errors import ConfigError
from mergeaudit.merging.mergekit_yaml import load_mergekit_config

# nine anchors of nine aliases each: 9^9 = 387M nodes once expanded (repr() of it needs GBs)
ALIAS_BOMB = (
    "[&a ["
    + ", ".join(["x"] * 9)
    + "], "
    + ", ".join(f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi"))
    + "]"
).encode()

# Each payload is the value of one merge parameter in an otherwise valid config, where the
# old loader handed it on (a config with only an unknown key would be refused for that key).
PAYLOADS = {
    "alias_bomb": ALIAS_BOMB,
    "recursive_alias": b"&r [*r]",
    "deep_nesting": b"[" * 100_000 + b"]" * 100_000,
    "not_utf8": b"caf\xe9",
    "utf16": b"1.0",  # the whole file is UTF-16
    "int_5000_digits": b"9" * 5000,
    "impossible_date": b"2024-13-45",
    "huge_list": b"[" + b"1," * 200_000 + b"1]",
}
TEMPLATES = {
    "audit": "base: {{name: base, uri: {m1}}}\nmodels: [{{name: a, uri: {m2}}}]\nresults_uri: {root}/results\n"
    "strategies:\n  - method: task_arithmetic\n    params:\n      lambda: ",
    "mergekit": "merge_method: linear\nmodels:\n  - model: {m1}\n  - model: {m2}\nparameters:\n  weight: ",
}


def hostile_file(kind: str, name: str, models: dict[str, str], root) -> bytes:
    head = TEMPLATES[kind].format(m1=models["m1"], m2=models["m2"], root=root)
    if name == "utf16":
        return (head + "1.0\n").encode("utf-16")
    return head.encode() + PAYLOADS[name] + b"\n"


def tiny_models(root) -> dict[str, str]:
    out = {}
    for i, name in enumerate(("m1", "m2")):
        tensors = {"model.layers.0.w": torch.full((4, 4), float(i + 1)), "model.norm.weight": torch.ones(4)}
        out[name] = write_checkpoint(str(root / name), tensors.items(), config={"model_type": "llama"})
    return out


LIMITED_CHILD = textwrap.dedent("""
    import resource, sys, time, tracemalloc
    resource.setrlimit(resource.RLIMIT_AS, (2_500_000_000, 2_500_000_000))
    from mergeaudit.config import load_config
    from mergeaudit.merging.mergekit_yaml import load_mergekit_config
    from mergeaudit.errors import ConfigError
    loader = load_config if sys.argv[1] == "audit" else load_mergekit_config
    for path in sys.argv[2:]:
        for traced in (False, True):  # timed without tracemalloc's overhead, then measured with it
            if traced:
                tracemalloc.start()
            t0 = time.perf_counter()
            try:
                loader(path)
                print(path, "ACCEPTED", sep="\\t", flush=True)
                break
            except ConfigError as exc:
                seconds, message = time.perf_counter() - t0, str(exc)
            finally:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        else:
            print(path, "REFUSED", seconds, peak, message, sep="\\t", flush=True)
""")


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[tuple[str, str], list[str]]:
    """(kind, case) -> [verdict, seconds, traced peak bytes, message], from one capped child per kind."""
    root = tmp_path_factory.mktemp("hostile-yaml")
    models = tiny_models(root)
    out = {}
    for kind in TEMPLATES:
        paths = {}
        for name in PAYLOADS:
            paths[name] = root / f"{kind}-{name}.yaml"
            paths[name].write_bytes(hostile_file(kind, name, models, root))
        run = subprocess.run(
            [sys.executable, "-c", LIMITED_CHILD, kind, *map(str, paths.values())],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ),
        )
        rows = {line.split("\t")[0]: line.split("\t")[1:] for line in run.stdout.splitlines()}
        for name, path in paths.items():
            out[kind, name] = rows.get(str(path), ["CRASHED", run.stderr[-2000:]])
    return out


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(PAYLOADS))
@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_hostile_yaml_is_refused_fast_in_one_line(refusals, kind, name):
    verdict, *rest = refusals[kind, name]
    assert verdict == "REFUSED", rest
    seconds, peak, message = rest
    limit = 5.0 if name == "huge_list" else 1.0  # 10k real nodes are parsed before the refusal (~0.2 s idle)
    assert float(seconds) < limit, f"refused after {seconds} s"
    assert int(peak) < 32 * 2**20, f"{int(peak) >> 20} MB traced while refusing"
    assert "\n" not in message and f"{kind}-{name}.yaml" in message


def test_alias_bomb_message_and_small_aliases_still_work(tmp_path):
    models = tiny_models(tmp_path)
    path = tmp_path / "bomb.yaml"
    path.write_bytes(hostile_file("mergekit", "alias_bomb", models, tmp_path))
    with pytest.raises(ConfigError, match="more than 10000 nodes once aliases are expanded .a YAML alias bomb"):
        load_mergekit_config(path)
    ok = tmp_path / "ok.yaml"
    ok.write_text(
        f"merge_method: linear\nmodels:\n  - {{model: {models['m1']}, parameters: &w {{weight: 0.5}}}}\n"
        f"  - {{model: {models['m2']}, parameters: *w}}\n"
    )
    plan = load_mergekit_config(ok)  # aliases within the budget load as before
    assert plan.model_parameters == [{"weight": 0.5}, {"weight": 0.5}]


def base_config(tmp_path, **over) -> dict:
    cfg = {
        "base": {"name": "base", "uri": str(tmp_path / "ck" / "base")},
        "models": [{"name": "a", "uri": str(tmp_path / "ck" / "a")}, {"name": "b", "uri": "s3://bkt/ck/b"}],
        "results_uri": str(tmp_path / "results"),
    }
    cfg.update(over)
    return cfg


def test_non_finite_and_absurd_weights_are_refused_all_at_once(tmp_path):
    raw = base_config(
        tmp_path,
        strategies=[
            {"method": "linear", "model_params": {"a": {"weight": float("nan")}, "b": {"weight": float("inf")}}},
            {"method": "task_arithmetic", "params": {"lambda": 1e308}},
            {"method": "ties", "grid": {"lambda": [0.5, float("-inf")]}},
            {"method": "ties", "model_params": {"a": {"density": [0.5, 1e300]}}},
        ],
    )
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    msg = str(info.value)
    for expected in (
        "strategies[0]",
        "finite number",
        "strategies[1]",
        "1e+308",
        "strategies[2]",
        "strategies[3]",
        "gradient value 1e+300",
    ):
        assert expected in msg, msg
    assert "\n" not in msg


def test_weights_within_bounds_still_validate(tmp_path):
    cfg = parse_config(
        base_config(
            tmp_path,
            strategies=[
                {
                    "method": "linear",
                    "model_params": {"a": {"weight": 1e6}, "b": {"weight": -2.5}},
                    "params": {"normalize": False},
                },
            ],
        )
    )
    assert cfg.strategies[0].model_params["a"]["weight"] == 1e6


def test_non_finite_or_absurd_numbers_elsewhere_in_the_config_are_refused(tmp_path):
    raw = base_config(
        tmp_path,
        probes={
            "task_vectors": [{"model": "a", "lambdas": [0.0, 1e308]}],
            "interpolations": [{"a": "base", "b": "a", "alphas": [0.0, 1.0, float("inf")]}],
            "perturbation": {"gaussian_scales": [float("nan")]},
        },
        geometry={"eta": float("inf")},
    )
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    msg = str(info.value)
    for where in (
        "probes.task_vectors.0.lambdas: 1e+308 lies beyond",
        "probes.interpolations.0.alphas.2",
        "probes.perturbation.gaussian_scales.0",
        "geometry.eta",
    ):
        assert where in msg, msg


@pytest.mark.integration
def test_million_point_grid_is_refused_quickly_with_size_and_limit(tmp_path):
    grid = {k: [0.1 * i for i in range(1, 11)] for k in ("lambda", "normalize_", "a", "b", "c", "d")}
    raw = base_config(tmp_path, strategies=[{"method": "task_arithmetic", "grid": grid}])
    child = textwrap.dedent("""
        import json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (2_500_000_000, 2_500_000_000))
        from mergeaudit.config import parse_config
        from mergeaudit.errors import ConfigError
        t0 = time.perf_counter()
        try:
            parse_config(json.loads(sys.argv[1]))
            print("ACCEPTED")
        except ConfigError as exc:
            print(time.perf_counter() - t0, exc, sep="\\t")
    """)
    # in a capped child: a validator that expands the grid would take GBs and many minutes
    out = subprocess.run(
        [sys.executable, "-c", child, json.dumps(raw)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    seconds, message = out.stdout.strip().split("\t")
    assert float(seconds) < 10
    assert "1000000 candidates" in message and "max_grid_points=4096" in message


def test_grid_limit_is_a_setting(tmp_path):
    strategies = [
        {"method": "task_arithmetic", "grid": {"lambda": [0.25, 0.5, 0.75]}},
        {"method": "task_arithmetic", "grid": {"lambda": [1.0, 1.5]}},
    ]
    assert parse_config(base_config(tmp_path, strategies=strategies, max_grid_points=5)).max_grid_points == 5
    with pytest.raises(ConfigError, match="the grids make 5 candidates .*more than max_grid_points=4"):
        parse_config(base_config(tmp_path, strategies=strategies, max_grid_points=4))


@pytest.mark.parametrize(
    "results,checkpoint_uri,word",
    [
        ("{tmp}/ck/base", "{tmp}/ck/base", "inside"),
        ("{tmp}/ck/base/results", "{tmp}/ck/base", "inside"),
        ("{tmp}/ck", "{tmp}/ck/base", "contains"),
        ("s3://bkt/ck/b/tables", "s3://bkt/ck/b", "inside"),
        ("s3://bkt", "s3://bkt/ck/b", "contains"),
    ],
)
def test_results_inside_or_around_a_checkpoint_are_refused(tmp_path, results, checkpoint_uri, word):
    raw = base_config(tmp_path, results_uri=results.format(tmp=tmp_path))
    raw["models"][1]["uri"] = checkpoint_uri.format(tmp=tmp_path)
    with pytest.raises(ConfigError, match=f"results_uri .* {word} checkpoint"):
        parse_config(raw)


def test_results_beside_checkpoints_are_fine(tmp_path):
    assert parse_config(base_config(tmp_path, results_uri=str(tmp_path / "ck-results"))).results_uri


def test_non_utf8_config_is_one_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def two_models(tmp_path):
    return tiny_models(tmp_path)


@pytest.mark.parametrize("weight", [".nan", ".inf", "1e308", "-.inf"])
def test_merge_with_bad_weights_exits_2_in_one_line_and_writes_nothing(two_models, tmp_path, capsys, weight):
    from mergeaudit.cli import main

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {two_models['m1']}\n"
        f"    parameters: {{weight: {weight}}}\n  - model: {two_models['m2']}\n    parameters: {{weight: 1.0}}\n"
    )
    code = main(["merge", str(cfg), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("mergeaudit: error:") and "finite number" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_merge_with_an_alias_bomb_exits_2_in_one_line(two_models, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_bytes(hostile_file("mergekit", "alias_bomb", two_models, tmp_path))
    # in a capped child: a merge that expands the bomb would take GBs
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, sys; "
            "resource.setrlimit(resource.RLIMIT_AS, (2_500_000_000, 2_500_000_000)); "
            "from mergeaudit.cli import main; sys.exit(main(sys.argv[1:]))",
            "merge",
            str(cfg),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "alias bomb" in out.stderr and out.stdout == ""
    assert not (tmp_path / "out").exists()
