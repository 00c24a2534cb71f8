"""The HTML report (parses, every plot present, opens in headless Chromium without errors), the
regression alarm on constructed runs, and the CLI commands over committed tables."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from mergeaudit import report, tables
from mergeaudit.results import compare as regression
from mergeaudit.results import leaderboard, load_run
from mergeaudit.results.alarm import AlarmSettings
from mergeaudit.results.stats import paired_t, prompt_mean_stderr, welch_z

MODELS = {"rl_math": "rlvr", "sft_code": "sft"}
MODULES = ["self_attn.q_proj", "mlp.down_proj"]


def cand(cid: str, name: str, kind: str, method: str | None = None, inputs=(), probe=None, status="ok") -> dict:
    params = {"probe": probe} if probe else {}
    return {
        "candidate_id": cid,
        "name": name,
        "kind": kind,
        "method": method,
        "params_json": json.dumps(params),
        "params_hash": cid[-4:],
        "input_names": list(inputs),
        "input_uris": [f"s3://ck/{n}" for n in inputs],
        "input_fingerprints": [f"fp-{n}" for n in inputs],
        "update_sparsity_bf16": 0.9,
        "status": status,
        "mergeaudit_version": "0.1.0",
        "error": None if status == "ok" else "CUDA out of memory",
    }


def score(
    cid: str,
    value: float,
    stderr: float | None = 0.01,
    task: str = "mergeaudit_add2",
    metric: str = "numeric_match",
    filt: str = "verifier",
) -> dict:
    return {
        "candidate_id": cid,
        "task": task,
        "metric": metric,
        "filter": filt,
        "value": value,
        "stderr": stderr,
        "n": 100,
    }


def constructed_run(merge_scores: dict[str, float], audit: str = "nightly", failed: tuple = ()) -> dict:
    """All tables of one audit run, built by hand: two models with 3 layers, one pair, three
    merges, an interpolation path and a perturbation probe."""
    geo = [
        {
            "scope": "tensor",
            "model": m,
            "kind": k,
            "tensor": f"model.layers.{layer}.{mod}.weight",
            "layer": layer,
            "module": mod,
            "numel": 100,
            "changed_bf16": 10 * (layer + 1),
            "sparsity_bf16": 1 - 0.1 * (layer + 1),
        }
        for m, k in MODELS.items()
        for layer in range(3)
        for mod in MODULES
    ]
    geo += [
        {
            "scope": "model",
            "model": m,
            "kind": k,
            "sparsity_bf16": 0.8,
            "sparsity_rel": 0.7,
            "sparsity_abs": 0.6,
            "rel_update_norm": 0.01,
        }
        for m, k in MODELS.items()
    ]
    pairs = [
        {
            "scope": "global",
            "model_a": "rl_math",
            "model_b": "sft_code",
            "kind_a": "rlvr",
            "kind_b": "sft",
            "mask": "bf16",
            "jaccard_lift": 1.3,
            "cosine": 0.05,
            "overlap_of_a": 0.2,
            "overlap_of_a_lift": 1.2,
            "sign_conflict_rate": 0.45,
        }
    ]
    cands = [
        cand("c-base", "base", "checkpoint", inputs=["base"]),
        cand("c-rl", "rl_math", "checkpoint", inputs=["rl_math"]),
        cand("c-sft", "sft_code", "checkpoint", inputs=["sft_code"]),
    ]
    scores = [score("c-base", 0.30), score("c-rl", 0.60), score("c-sft", 0.50)]
    for k, (name, value) in enumerate(merge_scores.items()):
        cid = f"c-merge{k}"
        cands.append(
            cand(
                cid,
                name,
                "merge",
                name.split("(")[0],
                ["rl_math", "sft_code"],
                status="failed" if name in failed else "ok",
            )
        )
        if name not in failed:
            scores.append(score(cid, value))
    for k, alpha in enumerate([0.0, 0.5, 1.0]):
        cands.append(
            cand(
                f"c-i{k}",
                f"interp(rl_math~sft_code; alpha={alpha})",
                "probe",
                "linear",
                ["rl_math", "sft_code"],
                probe={"family": "interpolation", "path": "rl_math~sft_code", "x": alpha, "seed": None},
            )
        )
        scores.append(score(f"c-i{k}", [0.6, 0.35, 0.5][k]))
    for k, scale in enumerate([0.01, 0.1]):
        cands.append(
            cand(
                f"c-g{k}",
                f"noise(rl_math; scale={scale})",
                "probe",
                "perturb_gaussian",
                ["rl_math"],
                probe={"family": "gaussian", "path": "rl_math", "x": scale, "seed": 0},
            )
        )
        scores.append(score(f"c-g{k}", [0.58, 0.2][k]))
    cands.append(
        {
            **cand("c-ps", "probe:interpolation:rl_math~sft_code", "probe_summary", "interpolation"),
            "input_names": ["rl_math", "sft_code"],
        }
    )
    scores.append(score("c-ps", 0.2, None, metric="barrier_height", filt="probe"))
    ckpts = [
        {
            "name": n,
            "role": "base" if n == "base" else "model",
            "kind": k,
            "uri": f"s3://ck/{n}",
            "fingerprint": f"fp-{n}",
            "n_tensors": 6,
            "nbytes": 1200,
            "model_type": "llama",
            "dtype": "BF16",
        }
        for n, k in {"base": "base", **MODELS}.items()
    ]
    return {
        "runs": [
            {
                "audit_name": audit,
                "status": "completed",
                "mergeaudit_version": "0.1.0",
                "package_versions": json.dumps({"torch": "2.13.0"}),
            }
        ],
        "checkpoints": ckpts,
        "geometry_tensors": geo,
        "geometry_pairs": pairs,
        "candidates": cands,
        "scores": scores,
    }


MERGES = {"ties(rl_math+sft_code)": 0.62, "linear(rl_math+sft_code)": 0.40, "sar(rl_math+sft_code)": 0.65}


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.images, self.external, self.open = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.figures.append(a.get("id"))
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("script", "link", "iframe") and (a.get("src") or a.get("href")):
            self.external.append((tag, a))
        if tag not in ("meta", "img", "br", "link", "input", "hr"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()


EXPECTED_PLOTS = {
    "plot-sparsity-rl-math",
    "plot-sparsity-sft-code",
    "plot-pairs",
    "plot-scores-mergeaudit-add2",
    "plot-probe-interpolation",
    "plot-probe-gaussian",
}


def test_report_is_one_self_contained_page_with_every_plot(tmp_path):
    root = str(tmp_path / "results")
    tables.write_run(root, "r1", "2026-11-26", constructed_run(MERGES))
    out = tmp_path / "report.html"
    report.write_report(root, str(out))
    page = out.read_text()
    parser = Collector()
    parser.feed(page)
    parser.close()
    assert parser.open == [], "every element is closed"
    assert set(parser.figures) == EXPECTED_PLOTS
    assert len(parser.images) == len(EXPECTED_PLOTS)
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert parser.external == [] and "http://" not in page and "https://" not in page
    for heading in ("Merge leaderboard", "Fragility probes", "Provenance", "Checkpoints"):
        assert heading in page
    # the leaderboard ranks merges against their best constituent; provenance names every input
    board = report.leaderboard(report.load_run(root))
    sar = next(r for r in board if r["candidate"] == "sar(rl_math+sft_code)")
    assert sar["best_input"] == 0.60 and sar["margin"] == pytest.approx(0.05)
    assert sar["best_input_name"] == "rl_math" and sar["beats_best_input"] is True  # Welch z = 3.5
    assert sar["p_vs_best_input"] == pytest.approx(0.5 * math.erfc(0.05 / (2**0.5 * 0.01) / 2**0.5))
    assert "rl_math = s3://ck/rl_math @ fp-rl_math" in page
    md = report.render_markdown(report.load_run(root))
    assert "## Merge leaderboard" in md and md.count("data:image/png;base64,") == len(EXPECTED_PLOTS)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.integration
def test_report_opens_in_headless_chromium(tmp_path):
    browser = chromium()
    if browser is None:
        if os.environ.get("MERGEAUDIT_REQUIRE_CHROMIUM"):
            pytest.fail("MERGEAUDIT_REQUIRE_CHROMIUM is set but no chromium is installed")
        pytest.skip("no chromium on this machine (make test installs it where it can)")
    root = str(tmp_path / "results")
    tables.write_run(root, "r1", "2026-11-26", constructed_run(MERGES))
    out = tmp_path / "report.html"
    report.write_report(root, str(out))
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            out.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'data-plots-ok="{len(EXPECTED_PLOTS)}"' in proc.stdout, proc.stdout[:2000]
    assert 'class="broken"' not in proc.stdout
    console_errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console_errors == []


def test_regressions_on_constructed_runs(tmp_path):
    from mergeaudit.cli import main as cli_main

    root = str(tmp_path / "results")
    tables.write_run(root, "r1", "2026-11-25", constructed_run(MERGES))
    tables.write_run(root, "x1", "2026-11-25", constructed_run({"ties(rl_math+sft_code)": 0.0}, audit="other"))
    first = regression.check_run(root, "r1")
    assert first.previous_run_id is None and first.regressions == []
    worse = {
        "ties(rl_math+sft_code)": 0.50,  # -0.12: far beyond 0.02 and 2 standard errors
        "linear(rl_math+sft_code)": 0.39,  # -0.01: under the absolute threshold
        "sar(rl_math+sft_code)": 0.65,
    }
    tables.write_run(root, "r2", "2026-11-26", constructed_run(worse, failed=("sar(rl_math+sft_code)",)))
    check = regression.check_run(root)  # the latest run, against r1 (not the other audit's x1)
    assert check.run_id == "r2" and check.previous_run_id == "r1"
    assert {(r.kind, r.candidate) for r in check.regressions} == {
        ("score_drop", "ties(rl_math+sft_code)"),
        ("newly_failed", "sar(rl_math+sft_code)"),
    }
    drop = next(r for r in check.regressions if r.kind == "score_drop")
    assert drop.drop == pytest.approx(0.12) and drop.test == "welch_z"  # no samples: no prompts to pair
    assert drop.p_value == pytest.approx(0.5 * math.erfc(0.12 / (2**0.5 * 0.01) / 2**0.5))
    assert "ties(rl_math+sft_code) mergeaudit_add2/numeric_match: 0.6200 -> 0.5000 (-0.1200; welch_z" in check.summary()
    # in standard-error units: the same drop with wide error bars is noise
    noisy = constructed_run({**worse, "ties(rl_math+sft_code)": 0.40})  # -0.10 against r2, se 0.10
    noisy["scores"] = [{**s, "stderr": 0.1} for s in noisy["scores"]]
    tables.write_run(root, "r3", "2026-11-27", noisy)
    assert [r.candidate for r in regression.check_run(root, "r3").regressions] == []
    assert [r.candidate for r in regression.check_run(root, "r3", AlarmSettings(significance=0.3)).regressions] == [
        "ties(rl_math+sft_code)"
    ]  # p = P[Z >= 0.1 / 0.141] = 0.24
    assert cli_main(["regressions", root, "--run", "r3"]) == 0
    assert cli_main(["regressions", root, "--run", "r3", "--significance", "0.3"]) == 1
    assert cli_main(["regressions", root, "--run", "r3", "--z", "0.5"]) == 1  # P[Z >= 0.5] = 0.31


def test_query_report_and_regressions_commands(run_cli, tmp_path):
    root = str(tmp_path / "results")
    tables.write_run(root, "r1", "2026-11-25", constructed_run(MERGES))
    ok = run_cli("regressions", root)
    assert ok.returncode == 0 and "no earlier committed run" in ok.stdout
    tables.write_run(root, "r2", "2026-11-26", constructed_run({**MERGES, "ties(rl_math+sft_code)": 0.3}))
    alarm = run_cli("regressions", root)
    assert alarm.returncode == 1 and "1 regression(s) against r1" in alarm.stdout
    q = run_cli("query", root, "select run_id, count(*) as n from scores group by run_id order by run_id")
    assert q.returncode == 0, q.stderr
    assert [line.split() for line in q.stdout.splitlines()[2:]] == [["r1", "12"], ["r2", "12"]]
    bad = run_cli("query", root, "select * from nowhere")
    assert bad.returncode == 2 and "names none of the tables" in bad.stderr
    out = tmp_path / "r.html"
    rep = run_cli("report", root, "--run", "r2", "--out", str(out))
    assert rep.returncode == 0, rep.stderr
    assert "1 regression(s) against r1" in out.read_text()


def test_report_and_regressions_refuse_what_is_not_there(run_cli, tmp_path):
    empty = run_cli("report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html"))
    assert empty.returncode == 2 and "no committed runs" in empty.stderr
    assert not (tmp_path / "r.html").exists()
    root = str(tmp_path / "results")
    tables.write_run(root, "r1", "2026-11-25", constructed_run(MERGES))
    unknown = run_cli("regressions", root, "--run", "r9")
    assert unknown.returncode == 2 and "run 'r9' is not committed" in unknown.stderr
    bad = run_cli("regressions", root, "--max-drop", "-1")
    assert bad.returncode == 2 and "max_drop" in bad.stderr


def with_samples(run: dict, rewards: dict[str, list[list[float]]], task: str = "mergeaudit_add2") -> dict:
    """The run with per-sample rows for the named candidates (one list of samples per prompt),
    and their scores recomputed from them with the prompt as the unit."""
    from mergeaudit.results.stats import prompt_mean_stderr

    ids = {c["name"]: c["candidate_id"] for c in run["candidates"]}
    run["samples"] = [
        {
            "candidate_id": ids[name],
            "task": task,
            "doc_id": i,
            "sample": j,
            "prompt_hash": f"h{i}",
            "reward": r,
            "verdict": r == 1.0,
        }
        for name, prompts in rewards.items()
        for i, rs in enumerate(prompts)
        for j, r in enumerate(rs)
    ]
    for s in run["scores"]:
        name = next(n for n, cid in ids.items() if cid == s["candidate_id"])
        if name in rewards and s["task"] == task:
            s["value"], s["stderr"] = prompt_mean_stderr(rewards[name])
            s["n"] = len(rewards[name])
    return run


def test_seventeen_worse_none_better_is_flagged_by_the_paired_test(tmp_path):
    """400 prompts, one sample each: 240 right before, 17 of them wrong now, none the other way.
    Unpaired: z = 1.2, p = 0.11, not flagged; McNemar: p = 2^-17."""
    root = str(tmp_path / "results")
    before = [[1.0]] * 240 + [[0.0]] * 160
    after = [[0.0]] * 17 + [[1.0]] * 223 + [[0.0]] * 160
    name = "ties(rl_math+sft_code)"
    tables.write_run(root, "r1", "2026-11-25", with_samples(constructed_run(MERGES), {name: before}))
    tables.write_run(root, "r2", "2026-11-26", with_samples(constructed_run(MERGES), {name: after}))
    check = regression.check_run(root, "r2")
    (flag,) = check.regressions
    assert (flag.candidate, flag.test, flag.n_shared, flag.n_better, flag.n_worse) == (name, "mcnemar", 400, 0, 17)
    assert flag.p_value == pytest.approx(0.5**17) and flag.drop == pytest.approx(17 / 400)
    assert "mcnemar on 400 shared prompts: 0 better, 17 worse, p=7.6e-06" in check.summary()
    unpaired = welch_z(0.6, prompt_mean_stderr(before)[1], 223 / 400, prompt_mean_stderr(after)[1])
    assert unpaired[0] == pytest.approx(1.22, abs=0.01) and unpaired[1] > 0.1
    # several samples per prompt: the paired t-test on per-prompt means
    many_before = [[1.0, 1.0, 0.0, 1.0]] * 30
    many_after = [[1.0, 0.0, 0.0, 1.0]] * 17 + [[1.0, 1.0, 0.0, 1.0]] * 13
    tables.write_run(root, "r3", "2026-11-27", with_samples(constructed_run(MERGES), {name: many_before}))
    tables.write_run(root, "r4", "2026-11-28", with_samples(constructed_run(MERGES), {name: many_after}))
    (flag,) = regression.check_run(root, "r4").regressions
    assert (flag.test, flag.n_better, flag.n_worse) == ("paired_t", 0, 17)
    assert flag.p_value == pytest.approx(paired_t([-0.25] * 17 + [0.0] * 13)[1]) and flag.p_value < 1e-5
    page = tmp_path / "r.html"
    report.write_report(root, str(page), "r4", regression.check_run(root, "r4"))
    assert "paired_t on 30 shared prompts: 0 better, 17 worse" in page.read_text()


def test_cli_report_and_flow_summary_share_one_leaderboard(tmp_path):
    root = str(tmp_path / "results")
    tables.write_run(root, "r1", "2026-11-26", constructed_run(MERGES))
    run = load_run(root)
    board = [r.model_dump() for r in leaderboard.rows(run)]
    assert report.leaderboard(report.load_run(root)) == board
    summary = [r for r in leaderboard.summary(run) if r.method != "probe"]
    assert [(r.candidate, r.score) for r in summary] == [(r["candidate"], r["score"]) for r in board]
    assert [r["candidate"] for r in board][:3] == ["sar(rl_math+sft_code)", "ties(rl_math+sft_code)", "rl_math"]


def test_mergebench_measures_subtract_the_base():
    from mergeaudit.results.scores import RunResults

    run = constructed_run({"ties(rl_math+sft_code)": 0.5})
    run["scores"] += [
        score("c-base", 0.2, task="t_code"),
        score("c-rl", 0.2, task="t_code"),
        score("c-sft", 0.6, task="t_code"),
        score("c-merge0", 0.4, task="t_code"),
    ]
    run["scores"] += [
        score(cid, v, task="t_other") for cid, v in (("c-base", 0.5), ("c-rl", 0.5), ("c-sft", 0.5), ("c-merge0", 0.3))
    ]
    data = RunResults("mem://", "r", run)
    (row,) = leaderboard.mergebench(data, {"rl_math": "mergeaudit_add2", "sft_code": "t_code"})
    # own tasks: rl 0.60 (base 0.30), sft 0.60 (base 0.20); merge 0.50 and 0.40
    assert row.normalized_performance == pytest.approx((0.5 / 0.6 + 0.4 / 0.6) / 2)
    assert row.gain_kept == pytest.approx((0.2 / 0.3 + 0.2 / 0.4) / 2)
    assert row.forgetting == pytest.approx(0.3 - 0.5) and row.forgetting_tasks == ["t_other"]
    flat = RunResults("mem://", "r", constructed_run({"ties(rl_math+sft_code)": 0.3}))
    flat.rows["scores"] = [{**s, "value": 0.3} if s["candidate_id"] == "c-rl" else s for s in flat.rows["scores"]]
    (row,) = leaderboard.mergebench(flat, {"rl_math": "mergeaudit_add2"})
    assert row.gain_kept is None and row.normalized_performance == pytest.approx(1.0)  # 0.0 gain: nothing to keep
    noisy = RunResults("mem://", "r", constructed_run({"ties(rl_math+sft_code)": 0.35}))
    noisy.rows["scores"] = [{**s, "value": 0.31} if s["candidate_id"] == "c-rl" else s for s in noisy.rows["scores"]]
    (row,) = leaderboard.mergebench(noisy, {"rl_math": "mergeaudit_add2"})
    assert row.gain_kept is None  # +0.01 with standard errors of 0.01 is noise: not "500% kept"


@pytest.mark.integration
def test_rendering_a_report_imports_neither_torch_nor_merge_methods():
    code = (
        "import sys, mergeaudit.report, mergeaudit.results; "
        "print(sorted(m for m in ('torch', 'numba', 'mergeaudit.merging', 'mergeaudit.probes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_demo_verdict_reads_the_results_module(tmp_path):
    """0.0 is a score; RLVR experts equal to the base 'kept the base's score' (not '99% kept');
    the SFT merge's kept share subtracts the base."""
    from mergeaudit.demo import OWN_TASKS, PAIRS, TASKS, verdict

    add, sub = TASKS["add"], TASKS["sub"]
    values = {
        "base": (0.0, 0.0),
        "sft_add": (0.8, 0.0),
        "sft_sub": (0.0, 0.6),
        "rl_add": (0.0, 0.0),
        "rl_sub": (0.0, 0.0),
        "ties(sft_add+sft_sub)": (0.4, 0.3),
        "ties(rl_add+rl_sub)": (0.0, 0.0),
    }
    cands, scores = [], []
    for k, (name, (a, b)) in enumerate(values.items()):
        merge = "(" in name
        inputs = list(PAIRS["sft" if "sft" in name else "rlvr"]) if merge else [name]
        cands.append(cand(f"c{k}", name, "merge" if merge else "checkpoint", "ties" if merge else None, inputs))
        scores += [score(f"c{k}", a, 0.05, task=add), score(f"c{k}", b, 0.05, task=sub)]
    geo = [
        {
            "scope": "model",
            "model": m,
            "kind": "x",
            "sparsity_bf16": 0.5,
            "principal_lift": 1.3 if m.startswith("sft") else 0.95,
            "update_rank_ratio": 1.0,
        }
        for m in OWN_TASKS
    ]
    pairs = [
        {"scope": "global", "model_a": a, "model_b": b, "jaccard_lift": 1.0, "cosine": 0.0} for a, b in PAIRS.values()
    ]
    ckpts = [{"name": n, "role": "base" if n == "base" else "model"} for n in values if "(" not in n]
    root = str(tmp_path / "results")
    tables.write_run(
        root,
        "d1",
        "2026-11-26",
        {
            "runs": [{"audit_name": "demo"}],
            "candidates": cands,
            "scores": scores,
            "geometry_tensors": geo,
            "geometry_pairs": pairs,
            "checkpoints": ckpts,
        },
    )
    text = verdict(root, "d1")
    assert "sft_add add 0.800 +/- 0.050 (gain 0.800, significant)" in text
    assert "rl_add add 0.000 +/- 0.050 (gain 0.000, not significant)" in text
    assert "gain over the base kept 50%" in text  # (0.4 / 0.8 + 0.3 / 0.6) / 2
    assert "rlvr experts did not improve on the base significantly: the merge kept the base's score." in text
    assert "the RLVR experts did not improve on the base significantly" in text and "99%" not in text
    assert "  principal-weight lift     1.300        0.950" in text
    assert "RLVR updates touch the base's principal weights less than SFT updates" in text


def test_the_leaderboard_marks_significance_at_the_runs_own_alarm_level():
    from mergeaudit.results.scores import RunResults

    def ties_row(run_tables: dict) -> leaderboard.LeaderRow:
        run = RunResults("mem://r", "r1", run_tables)
        return next(r for r in leaderboard.rows(run) if r.candidate == "ties(rl_math+sft_code)")

    plain = constructed_run(MERGES)  # 0.62 vs its best input 0.60, se 0.01 each: Welch p = 0.079
    row = ties_row(plain)
    assert row.p_vs_best_input == pytest.approx(0.5 * math.erfc(0.02 / (2**0.5 * 0.01) / 2**0.5))
    assert row.beats_best_input is False  # no config: 0.05
    loose = constructed_run(MERGES)
    loose["runs"][0]["config_json"] = json.dumps({"alarm": {"significance": 0.1}})
    assert ties_row(loose).beats_best_input is True
    assert leaderboard.run_significance(RunResults("mem://r", "r1", loose)) == 0.1
    legacy = constructed_run(MERGES)
    legacy["runs"][0]["config_json"] = json.dumps({"alarm": {"z": 1.0}})  # P[Z >= 1] = 0.16
    assert ties_row(legacy).beats_best_input is True
