"""Deploy-time steps for prefect.yaml: checks that run when `prefect deploy` makes a deployment.

    build:
      - mergeaudit.deployments.steps.require_variables:
          names: [MERGEAUDIT_PROJECT_DIR, MERGEAUDIT_NIGHTLY_CONFIG]

Prefect fills `{{ $VAR }}` from the deploying shell's environment and only warns when one is
unset; the deployment then gets an empty parameter, and its runs fail later (at 02:00, or every
five minutes for the watcher). This step makes the deploy of that deployment fail instead, with
one message naming every unset variable.
"""

from __future__ import annotations

import os


class UnsetVariablesError(RuntimeError):
    """`prefect deploy` of a deployment whose MERGEAUDIT_* variables are unset or empty."""


def require_variables(names: list[str], deployment: str = "this deployment") -> dict:
    """Fail the deploy when any of the environment variables `names` is unset or empty."""
    missing = [n for n in names if not os.environ.get(n, "").strip()]
    if missing:
        raise UnsetVariablesError(
            f"{deployment} reads {', '.join('$' + n for n in missing)} at deploy time, and "
            f"{'it is' if len(missing) == 1 else 'they are'} unset: export "
            f"{' '.join(n + '=...' for n in missing)} (README, Running on Prefect) and deploy again"
        )
    return {"checked": list(names)}
