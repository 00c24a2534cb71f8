"""Prefect flows: they orchestrate mergeaudit library functions and hold no computation.

This folder is installed as `mergeaudit.flows` (see setup.py); import it by that name.

Importing this package gives Prefect's ephemeral API (started in-process when no
PREFECT_API_URL is set, as `mergeaudit audit` and `make demo` do) 90 s to come up instead of
Prefect's 20: on a loaded 2-core machine its start measured ~8.5 s idle and timed out under
load. This must run before prefect is imported, which is why it lives here; an explicit
setting in the environment wins.
"""

import os

EPHEMERAL_STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
os.environ.setdefault(EPHEMERAL_STARTUP_SETTING, "90")
