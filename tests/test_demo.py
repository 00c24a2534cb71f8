"""`mergeaudit demo` end to end on the shipped toy experts (one run per session, the `demo_run`
fixture in conftest.py, shared with the console-script smoke test), and the README's copy of its
verdict, which must be what a fresh run prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeaudit.demo import README_BEGIN, README_END, readme_block, verdict_block, with_readme_block

README = Path(__file__).resolve().parent.parent / "README.md"


def test_demo_audits_the_shipped_experts(demo_run):
    workdir, stdout = demo_run
    assert "toy experts: the shipped ones" in stdout
    for expected in (
        "Verdict",
        "SFT pair",
        "RLVR pair",
        "bf16 sparsity",
        "overlap lift",
        "interval over tensors",
        "principal-weight lift",
        "update rank",
        "forgetting",
        "best merge of each pair",
        "gain over the base kept",
        "sar(rl_add+rl_sub)",
        "report:",
    ):
        assert expected in stdout, expected
    page = (workdir / "report.html").read_text()
    assert "Verdict" in page and "plot-sparsity-rl-add" in page and "plot-probe-interpolation" in page


def test_readme_shows_the_verdict_a_fresh_demo_prints(demo_run):
    _, stdout = demo_run
    shown = readme_block(README.read_text())
    assert shown is not None, "README.md lacks the demo verdict block (scripts/update_readme_demo.py writes it)"
    assert shown == verdict_block(stdout), "README.md's demo verdict is stale: run scripts/update_readme_demo.py"


def test_readme_block_round_trips():
    readme = f"intro\n{README_BEGIN}\n```text\nold\n```\n{README_END}\nrest\n"
    new = with_readme_block(readme, "Verdict (a)\n  line\n")
    assert readme_block(new) == "Verdict (a)\n  line\n" and new.endswith(f"{README_END}\nrest\n")
    assert verdict_block("noise\nVerdict (a)\n  line\n\nrun 1: tables\nreport: x\n") == "Verdict (a)\n  line\n"
    with pytest.raises(ValueError):
        with_readme_block("intro\n<!-- demo verdict: begin -->\n", "x")
