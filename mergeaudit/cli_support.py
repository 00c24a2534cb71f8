"""What the `mergeaudit` command shares between its commands: flags made from a settings
model's fields, `NAME=URI` model lists, and plain tables for the terminal."""

from __future__ import annotations

import argparse
import typing


def add_settings_options(parser: argparse.ArgumentParser, model, fields: tuple[str, ...]) -> None:
    """A flag per field of a settings model: `--top-k-fraction` for `top_k_fraction`, typed and
    described by the field; a boolean that defaults to true becomes `--no-NAME`. Unset flags
    stay None, so the model's own default applies."""
    for name in fields:
        info = model.model_fields[name]
        flag = "--" + name.replace("_", "-")
        default = info.default
        text = (info.description or "").rstrip(".")
        if info.annotation is bool:
            negate = default is True
            parser.add_argument(
                f"--no-{name.replace('_', '-')}" if negate else flag,
                dest=name,
                default=None,
                action="store_false" if negate else "store_true",
                help=f"{'not: ' if negate else ''}{text}",
            )
            continue
        kind = info.annotation
        if typing.get_origin(kind) is not typing.Literal:  # X | None: X
            kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        choices = list(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal else None
        parser.add_argument(
            flag,
            dest=name,
            default=None,
            choices=choices,
            type=None if choices else kind if kind in (int, float) else str,
            help=text + ("" if default is None else f" (default {default})"),
        )


def settings_from_args(model, args: argparse.Namespace, fields: tuple[str, ...], **fixed):
    """The settings model from the flags that were given (the model's defaults for the rest)."""
    given = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    return model(**given, **fixed)


def parse_models(specs: list[str]) -> dict[str, str]:
    """`NAME=URI` or `URI` (named after its folder) -> {name: uri}; names must be unique."""
    from mergeaudit import store
    from mergeaudit.errors import ConfigError

    models: dict[str, str] = {}
    for spec in specs:
        name, sep, uri = spec.partition("=")
        if not sep or "://" in name or "/" in name:
            name, uri = store.basename(spec), spec
        if name in models:
            raise ConfigError(f"two models are named {name!r}; name them explicitly as NAME=URI")
        models[name] = store.check_uri(uri)
    return models


def format_table(rows: list[dict]) -> str:
    """A plain fixed-width table of dict rows (floats to 4 places)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])

    def cell(v) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
