"""Regenerate the demo verdict the README shows, from a fresh `mergeaudit demo` run.

Runs `python -m mergeaudit.cli demo` in a temporary work folder (the shipped toy experts, the
full evaluation), takes the verdict it prints (mergeaudit.demo.verdict_block) and writes it
between the README's markers; the test suite checks the README against a fresh run the same way
(tests/test_demo.py). With --output FILE it reads a saved demo output instead of running one.

    .venv/bin/python scripts/update_readme_demo.py            # ~2 min on 2 cores
    .venv/bin/python scripts/update_readme_demo.py --output demo.txt
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mergeaudit.demo import readme_block, verdict_block, with_readme_block

README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="a saved `mergeaudit demo` output to take the verdict from")
    parser.add_argument("--readme", default=str(README), help=f"the README to rewrite (default {README})")
    args = parser.parse_args()
    if args.output:
        stdout = Path(args.output).read_text()
    else:
        with tempfile.TemporaryDirectory(prefix="mergeaudit-demo-") as tmp:
            t0 = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "mergeaudit.cli", "demo", "--workdir", tmp], capture_output=True, text=True
            )
            if run.returncode != 0:
                print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
                return run.returncode
            stdout = run.stdout
            print(f"demo ran in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    block = verdict_block(stdout)
    readme = Path(args.readme)
    text = readme.read_text()
    if readme_block(text) == block:
        print(f"{readme}: the verdict block is already current")
        return 0
    readme.write_text(with_readme_block(text, block))
    print(f"{readme}: verdict block rewritten ({len(block.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
