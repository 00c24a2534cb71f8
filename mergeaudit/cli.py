"""The `mergeaudit` command.

    mergeaudit audit CONFIG.yaml          run the audit flow on a YAML AuditConfig
    mergeaudit submit CONFIG.yaml [--deployment merge-audit/on-demand]   start a deployment's run
    mergeaudit demo [--workdir DIR]       build tiny checkpoints, audit them, print a summary
    mergeaudit geometry BASE MODEL... --out RESULTS [--kind NAME=rlvr]   update geometry tables
    mergeaudit merge CONFIG.yaml OUT [--overwrite] [--device cpu|cuda] [--seed N]   run a mergekit config
    mergeaudit fisher MODEL CALIB.jsonl --out CACHE   diagonal Fisher for the fisher/sar methods
    mergeaudit discover PREFIX [--marker] list checkpoints under a prefix and their completeness
    mergeaudit convert SRC OUT --allow-pickle   pickled weights -> safetensors (weights_only)
    mergeaudit notify-receiver --prefix URI [--port 8088]   bucket notifications -> checkpoint events
    mergeaudit query RESULTS "SQL"        DuckDB over the committed result tables (no file access)
    mergeaudit vacuum RESULTS [--older-than SECONDS]   delete files of killed or replaced writers
    mergeaudit report RESULTS [--run ID] --out report.html   self-contained HTML report
    mergeaudit regressions RESULTS [--run ID]   regression check; exits 1 when one is found

User errors (a config that does not validate, a missing checkpoint, an unknown store scheme)
print one line and exit with status 2; only bugs show a traceback.

The CLI is the application entry, the one library module that may start the orchestration
layer: `audit`, `demo` and `notify-receiver` import it (mergeaudit.flows) inside the command, so
every other command works without Prefect.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

from mergeaudit.cli_support import add_settings_options, format_table, parse_models, settings_from_args
from mergeaudit.errors import MergeAuditError

DEMO_WORKDIR = "./.mergeaudit/demo"
EXIT_USER_ERROR = 2
EXIT_ALARM = 1


def run_audit(config) -> tuple[dict, str | None]:
    """Check everything that can be checked before the flow starts, then run the flow.

    Returns the flow's result and, when the run ended Failed after committing its tables
    (failed candidates, regressions), its summary."""
    from mergeaudit.audit import preflight

    preflight(config)  # missing checkpoints, bad strategies: one line, before Prefect starts
    from mergeaudit.flows.merge_audit import merge_audit  # Prefect loads only for a config that checks out

    state = merge_audit(config, return_state=True)
    data = state.result(raise_on_failure=False)
    if isinstance(data, BaseException):
        raise data
    return data, None if state.is_completed() else (state.message or state.name)


def cmd_audit(args: argparse.Namespace) -> int:
    from mergeaudit.checkpoint.reads import summary_lines
    from mergeaudit.config import load_config

    result, problems = run_audit(load_config(args.config))
    print(format_table(result["summary"]))
    for note in result.get("notes", []):
        print(note)
    for line in summary_lines(result.get("bytes_read", {}), result.get("input_sizes", {})):
        print(line)
    print(f"\nrun {result['run_id']}: tables under {result['results_uri']}")
    if problems:
        print(f"mergeaudit: audit ended Failed:\n{problems}", file=sys.stderr)
        return EXIT_ALARM
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from mergeaudit.audit import preflight
    from mergeaudit.config import load_config

    config = load_config(args.config)
    if not args.no_preflight:
        preflight(config)  # from here: a bad checkpoint fails now, not on a worker
    from mergeaudit.flows.merge_audit import submit

    run = submit(config, args.deployment)
    print(f"submitted {args.config} to {args.deployment}: flow run {run['name']} ({run['id']}), {run['state']}")
    if run["url"]:
        print(run["url"])
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from mergeaudit import tables

    rows = tables.query(args.results, args.sql, run_id=args.run).to_pylist()
    print(format_table(rows[: args.max_rows]))
    if len(rows) > args.max_rows:
        print(f"... {len(rows) - args.max_rows} more rows (--max-rows)")
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    from mergeaudit import tables

    removed = tables.vacuum(args.results, older_than_s=args.older_than)
    for uri in removed:
        print(f"removed {uri}")
    print(f"{len(removed)} files removed (uncommitted, superseded or temporary, older than {args.older_than:g} s)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from mergeaudit.merging import REGISTRY

    rows = [
        {
            "method": m.name,
            "base": m.base,
            "models": f"{m.min_models}-{m.max_models or 'n'}",
            "random": "yes" if m.stochastic else "",
            "parameters": ", ".join(f.alias or n for n, f in m.params.model_fields.items()),
            "reference": m.reference,
        }
        for m in REGISTRY.methods()
    ]
    print(format_table(rows))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mergeaudit import report
    from mergeaudit.results import compare

    check = compare.check_run(args.results, args.run)
    out = report.write_report(args.results, args.out, run_id=check.run_id, regression=check)
    print(f"wrote {out} (run {check.run_id})")
    return 0


def cmd_regressions(args: argparse.Namespace) -> int:
    from mergeaudit.results import compare
    from mergeaudit.results.alarm import AlarmSettings

    extra = {"z": args.z} if args.z is not None else {}
    check = compare.check_run(args.results, args.run, settings_from_args(AlarmSettings, args, ALARM_OPTIONS, **extra))
    print(check.summary())
    return EXIT_ALARM if check.regressions else 0


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from mergeaudit.config import parse_config
    from mergeaudit.demo import demo_config, prepare_demo, verdict, write_demo_report
    from mergeaudit.toy.experts import QUICK_RECIPE, ExpertRecipe

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo builds everything locally
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    family = prepare_demo(workdir, QUICK_RECIPE if args.quick else ExpertRecipe(), retrain=args.retrain)
    raw = demo_config(family, workdir)
    if args.limit:
        raw["evaluation"]["limit"] = args.limit
    config_path = workdir / "audit.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    print(f"auditing with {config_path}")
    result, problems = run_audit(parse_config(raw, source=str(config_path)))
    run_id = result["run_id"]
    text = verdict(result["results_uri"], run_id)
    html_path = write_demo_report(result, text, workdir / "report.html")
    print()
    print(format_table([r for r in result["summary"] if r["method"] != "probe"]))
    print()
    print(text)
    print(f"\nrun {run_id}: Parquet tables under {result['results_uri']}")
    print(f"report: {html_path}")
    print(f"demo took {time.perf_counter() - t0:.0f} s")
    if problems:
        print(f"mergeaudit: audit ended Failed:\n{problems}", file=sys.stderr)
        return EXIT_ALARM
    return 0


def cmd_geometry(args: argparse.Namespace) -> int:
    from mergeaudit.audit import geometry_run
    from mergeaudit.config import CheckpointSpec
    from mergeaudit.errors import ConfigError
    from mergeaudit.geometry import GeometrySettings
    from mergeaudit.results.geometry_views import not_compared

    models = parse_models(args.models)
    kinds: dict[str, str] = {}
    for item in args.kind:
        name, _, kind = item.partition("=")
        if name not in models:
            raise ConfigError(f"--kind {item}: no model named {name!r}; models: {', '.join(models)}")
        kinds[name] = CheckpointSpec(name=name, uri=models[name], kind=kind).kind
    settings = settings_from_args(GeometrySettings, args, GEOMETRY_OPTIONS)
    run_id, files, tensor_rows, pair_rows = geometry_run(args.base, models, kinds, settings, args.out)
    summary = [
        {
            "model": r["model"],
            "kind": r["kind"],
            "sparsity_bf16": r["sparsity_bf16"],
            "sparsity_rel": r["sparsity_rel"],
            "rel_update_norm": r["rel_update_norm"],
        }
        for r in tensor_rows
        if r["scope"] == "model"
    ]
    pairs = [
        {
            "pair": f"{r['model_a']}~{r['model_b']}",
            "overlap_of_a_lift": r["overlap_of_a_lift"],
            "jaccard_lift": r["jaccard_lift"],
            "sign_conflicts": r["sign_conflict_rate"],
            "cosine": r["cosine"],
        }
        for r in pair_rows
        if r["scope"] == "global"
    ]
    print(format_table(summary))
    for note in not_compared(tensor_rows):
        print(note)
    if pairs:
        print()
        print(format_table(pairs))
    print(f"\nrun {run_id}: " + ", ".join(f"{t} -> {u}" for t, u in files.items() if t != "runs"))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from mergeaudit.merging.executor import run_merge
    from mergeaudit.merging.mergekit_yaml import load_mergekit_config

    plan = load_mergekit_config(args.config, seed=args.seed, device=args.device)
    if args.fisher:
        plan = plan.model_copy(update={"fisher": dict(parse_models(args.fisher))})
    report = run_merge(
        plan, args.out, max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite, protect=[args.config]
    )
    print(
        f"merged {plan.method} of {len(plan.models)} models into {args.out}: "
        f"{len(report['tensors'])} tensors, {report['erased_fraction']:.2%} of the merged update erased by "
        f"the cast to {plan.out_dtype or 'the stored dtype'}; details in {args.out}/mergeaudit_merge.json"
    )
    return 0


def cmd_fisher(args: argparse.Namespace) -> int:
    from mergeaudit.fisher import FisherSettings, estimate_fisher

    settings = settings_from_args(
        FisherSettings, args, FISHER_OPTIONS, calibration=args.calibration, cache_uri=args.out
    )
    print(estimate_fisher(args.model, settings))
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from mergeaudit.checkpoint import discover

    rows = [
        {"checkpoint": s.uri, "complete": s.complete, "fingerprint": s.fingerprint, "problem": s.problem}
        for s in discover(args.prefix, marker=args.marker)
    ]
    print(format_table(rows))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from mergeaudit.checkpoint.convert import convert_pickled

    out = convert_pickled(args.src, args.out, allow_pickle=args.allow_pickle)
    print(f"wrote {out}")
    return 0


def cmd_notify_receiver(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # SIGTERM (a service manager's stop) ends it as SIGINT does, and SIGINT does even when this
    # process started with it ignored (a background job of a non-interactive shell)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    from mergeaudit.flows.watch import announce  # emits the Prefect event mergeaudit.checkpoint.landed
    from mergeaudit.notify import serve

    serve(
        args.host,
        args.port,
        args.prefix,
        announce,
        state_uri=args.state_uri,
        marker=args.marker,
        kind=args.kind,
        rules=args.kind_rule,
    )
    return 0


# Options made from the settings models' own fields (type, default, help), so a knob is declared
# once, in its subsystem: the YAML, the Prefect UI's form and these flags all follow it.
GEOMETRY_OPTIONS = ("spectral", "top_k_fraction", "eta", "abs_tol", "exact_max_dim", "principal_alpha", "device")
FISHER_OPTIONS = ("max_examples", "max_length", "device")
ALARM_OPTIONS = ("max_drop", "significance", "metrics")


# The models are imported only when their command's parser is built: `mergeaudit query` must
# not wait for torch.
def _geometry_settings():
    from mergeaudit.geometry.settings import GeometrySettings

    return GeometrySettings


def _fisher_settings():
    from mergeaudit.fisher import FisherSettings

    return FisherSettings


def _alarm_settings():
    from mergeaudit.results.alarm import AlarmSettings

    return AlarmSettings


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; given `command`, only that command gets the options made
    from a settings model (importing a model can take seconds)."""

    def wanted(name: str) -> bool:
        return command is None or command == name

    parser = argparse.ArgumentParser(prog="mergeaudit", description="Audit merges of RLVR-trained checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("audit", help="run the merge audit flow on a YAML AuditConfig")
    p.add_argument("config", help="path of the AuditConfig YAML")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("submit", help="start a run of a merge-audit deployment with a YAML AuditConfig (no wait)")
    p.add_argument("config", help="path or store URI of the AuditConfig YAML")
    p.add_argument(
        "--deployment", default="merge-audit/on-demand", help="FLOW/DEPLOYMENT (default merge-audit/on-demand)"
    )
    p.add_argument(
        "--no-preflight",
        action="store_true",
        help="do not open the checkpoints here (the workers can, this machine not)",
    )
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("demo", help="train toy SFT and RLVR experts, audit them, print a verdict")
    p.add_argument("--workdir", default=DEMO_WORKDIR, help=f"where the demo store lives (default {DEMO_WORKDIR})")
    p.add_argument("--quick", action="store_true", help="a few training steps only (tests; the verdict means little)")
    p.add_argument("--limit", type=int, default=None, help="evaluate this many problems per task (default: all)")
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the toy experts from scratch (~3 min) and say whether they match the shipped ones",
    )
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("geometry", help="update geometry of fine-tuned checkpoints against a base")
    p.add_argument("base", help="base checkpoint URI")
    p.add_argument("models", nargs="+", help="fine-tuned checkpoints: URI or NAME=URI")
    p.add_argument("--out", required=True, help="results URI for geometry_tensors and geometry_pairs")
    p.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="NAME=KIND",
        help="training kind of a model: rlvr, sft, base or unknown (repeatable)",
    )
    if wanted("geometry"):
        add_settings_options(p, _geometry_settings(), GEOMETRY_OPTIONS)
    p.set_defaults(func=cmd_geometry)
    p = sub.add_parser("merge", help="run a mergekit YAML config (unchanged) and write the merged checkpoint")
    p.add_argument("config", help="mergekit YAML: models, base_model, merge_method, parameters, dtype, ...")
    p.add_argument("out", help="output checkpoint URI (path or s3://)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (DARE, DELLA)")
    p.add_argument("--max-shard-bytes", type=int, default=None, help="shard size of the output (default 2 GiB)")
    p.add_argument(
        "--fisher",
        nargs="*",
        default=[],
        metavar="MODEL=URI",
        help="Fisher checkpoints of the models (for the fisher and sar methods)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT when it holds a previous mergeaudit output (anything else is never replaced)",
    )
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("fisher", help="estimate a model's diagonal Fisher on a calibration JSONL")
    p.add_argument("model", help="checkpoint URI")
    p.add_argument("calibration", help="JSONL of {prompt, response} rows")
    p.add_argument("--out", required=True, help="cache folder for Fisher checkpoints")
    if wanted("fisher"):
        add_settings_options(p, _fisher_settings(), FISHER_OPTIONS)
    p.set_defaults(func=cmd_fisher)
    p = sub.add_parser("discover", help="list the checkpoints under a prefix and whether each is complete")
    p.add_argument("prefix", help="folder or bucket prefix (path, file://, s3://)")
    p.add_argument("--marker", default=None, help="completion marker file a complete checkpoint must hold")
    p.set_defaults(func=cmd_discover)
    p = sub.add_parser("convert", help="convert pickled .bin/.pt weights to safetensors (explicit opt-in)")
    p.add_argument("src", help="checkpoint folder with pytorch_model*.bin")
    p.add_argument("out", help="where to write the safetensors checkpoint")
    p.add_argument(
        "--allow-pickle", action="store_true", help="required: load the pickles with torch.load(weights_only=True)"
    )
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser(
        "notify-receiver", help="turn S3/MinIO bucket notifications into mergeaudit.checkpoint.landed events"
    )
    p.add_argument("--prefix", action="append", required=True, help="watched s3:// prefix (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8088)
    p.add_argument("--state-uri", default=None, help="the watcher's state (shared with watch-checkpoints)")
    p.add_argument("--marker", default=None, help="completion marker a complete checkpoint must hold")
    p.add_argument("--kind", default="rlvr", help="training kind of checkpoints no --kind-rule matches")
    p.add_argument(
        "--kind-rule",
        action="append",
        default=[],
        metavar="PATTERN=KIND",
        help="kind of the checkpoints whose path under the prefix matches a glob (`*sft*=sft`); first match wins",
    )
    p.set_defaults(func=cmd_notify_receiver)
    p = sub.add_parser("query", help="run SQL (DuckDB) over the committed result tables")
    p.add_argument("results", help="results URI (path or s3://)")
    p.add_argument(
        "sql",
        help="SQL naming the tables: runs, checkpoints, geometry_tensors, geometry_pairs, "
        "candidates, scores, samples (each with date and run_id columns)",
    )
    p.add_argument("--run", default=None, help="only this run's rows")
    p.add_argument("--max-rows", type=int, default=200)
    p.set_defaults(func=cmd_query)
    p = sub.add_parser("vacuum", help="delete files of killed or replaced writers from a results store")
    p.add_argument("results", help="results URI (path or s3://)")
    p.add_argument(
        "--older-than",
        type=float,
        default=6 * 3600,
        metavar="SECONDS",
        help="only files at least this old, so writes in progress survive (default 6 h)",
    )
    p.set_defaults(func=cmd_vacuum)
    p = sub.add_parser("methods", help="list the merge methods with their parameters and references")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("report", help="write a run's self-contained HTML report with plots")
    p.add_argument("results", help="results URI (path or s3://)")
    p.add_argument("--run", default=None, help="run id (default: the latest committed run)")
    p.add_argument("--out", required=True, help="where to write the HTML (path or store URI)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("regressions", help="compare a run with the previous run of its audit; exit 1 on regressions")
    p.add_argument("results", help="results URI (path or s3://)")
    p.add_argument("--run", default=None, help="run id (default: the latest committed run)")
    if wanted("regressions"):
        add_settings_options(p, _alarm_settings(), ALARM_OPTIONS)
    p.add_argument(
        "--z",
        type=float,
        default=None,
        help="deprecated: the one-sided level of this many standard errors (z = 2: p <= 0.023)",
    )
    p.set_defaults(func=cmd_regressions)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    import pydantic

    try:
        return args.func(args)
    except (MergeAuditError, pydantic.ValidationError) as exc:
        if isinstance(exc, pydantic.ValidationError):
            from mergeaudit.config import format_validation_error

            exc = format_validation_error(exc)
        print("mergeaudit: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return EXIT_USER_ERROR
    except RuntimeError as exc:
        # Prefect raises a bare RuntimeError (with the server's output) when its ephemeral API
        # does not come up in time; flows/__init__.py raises the limit to 90 s
        if "ephemeral Prefect API server" not in str(exc):
            raise
        setting = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
        print(
            f"mergeaudit: error: Prefect's ephemeral API did not start within {os.environ.get(setting, '20')} s "
            f"(machine busy?); raise {setting}, or set PREFECT_API_URL to a running Prefect server",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
