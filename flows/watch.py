"""The checkpoint watcher: announce every newly complete checkpoint under some prefixes.

Deployed as `watch-checkpoints/poll` on an interval schedule. Each run lists the prefixes,
emits `mergeaudit.checkpoint.landed` once per complete checkpoint it has not announced in this
version (the `merge-audit/on-checkpoint` deployment is triggered by that event), and records
what it announced in the store, so a restarted watcher does not announce it again.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.events import emit_event

from mergeaudit import watch
from mergeaudit.errors import ConfigError


def announce(landed: watch.Landed) -> None:
    """Emit `mergeaudit.checkpoint.landed`; the id is stable, so Prefect drops a repeat. The
    bucket-notification receiver (`mergeaudit notify-receiver`, mergeaudit.notify) announces
    with it too."""
    watch.check_landed(landed)  # an event the on-checkpoint trigger would drop is an error here
    emit_event(
        event=watch.EVENT,
        resource={"prefect.resource.id": landed.resource_id, "prefect.resource.name": landed.name},
        payload=landed.payload(),
        id=landed.event_id,
    )


@flow(name="watch-checkpoints", persist_result=True)
def watch_checkpoints(
    prefixes: list[str],
    state_uri: str,
    marker: str | None = None,
    kind: str = "rlvr",
    kind_rules: list[str] | None = None,
) -> list[dict]:
    """Emit one event per newly complete checkpoint; returns what was announced. A checkpoint's
    kind is that of the first of `kind_rules` (`PATTERN=KIND`, a glob on its path under the
    prefix: `*sft*=sft`) that matches, else `kind`."""
    unset = [
        var
        for var, value in (("MERGEAUDIT_WATCH_PREFIX", prefixes), ("MERGEAUDIT_WATCH_STATE", [state_uri]))
        if not value or not all(v and v.strip() for v in value)
    ]
    if unset:
        raise ConfigError(
            f"prefixes or state_uri is empty: {' and '.join('$' + v for v in unset)} was unset when "
            "watch-checkpoints/poll was deployed; set it and run `prefect deploy --all` again"
        )
    log = get_run_logger()
    announced = []
    state = watch.load_state(state_uri)
    for landed in watch.new_checkpoints(prefixes, state, marker=marker, kind=kind, rules=kind_rules):
        announce(landed)
        watch.remember(state_uri, landed)
        log.info("announced %s (%s, kind %s)", landed.uri, landed.fingerprint, landed.kind)
        announced.append(landed.payload())
    log.info("polled %s: %d new complete checkpoint(s)", ", ".join(prefixes), len(announced))
    return announced
