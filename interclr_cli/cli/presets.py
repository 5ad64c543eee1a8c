"""`interclr presets`, `interclr presets show NAME` and `interclr presets keys`."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..config.loader import key_table, list_presets, load_config, to_mapping, to_yaml
from .common import OverridesArg, emit_json

app = typer.Typer(
    help="List the shipped presets, print one resolved, or list every config key (`keys`: type, default and "
    "allowed values).\n\nExamples:\n\n  interclr presets\n\n  interclr presets show r18-cifar optim.lr=0.06"
    "\n\n  interclr presets keys",
    no_args_is_help=False,
    invoke_without_command=True,
)


@app.callback(invoke_without_command=True)
def presets_main(
    ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print {name: description} as JSON.")
) -> None:
    """List the shipped presets with one line each."""
    if ctx.invoked_subcommand is not None:
        return
    items = list_presets()
    if as_json:
        emit_json(items)
        return
    t = Table(show_header=True, box=None)
    t.add_column("preset", style="bold")
    t.add_column("description")
    for name, desc in items.items():
        t.add_row(name, desc)
    Console().print(t)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Preset name or YAML path."),
    overrides: Optional[List[str]] = OverridesArg,
    as_json: bool = typer.Option(False, "--json", help="Print the resolved config as JSON."),
) -> None:
    """Print the fully resolved config of a preset (inheritance and overrides applied).

    Examples:

      interclr presets show quickstart

      interclr presets show r50-imagenet method.inter.neg_sampling=hard --json
    """
    cfg = load_config(name, list(overrides or []))
    if as_json:
        emit_json(to_mapping(cfg))
    else:
        typer.echo(to_yaml(cfg), nl=False)


@app.command("keys")
def keys(as_json: bool = typer.Option(False, "--json", help="Print {key: {type, default, choices}} as JSON.")) -> None:
    """List every config key with its type, default and allowed values (from the schema).

    Any of them can be set in a preset or as a key=value override.

    Examples:

      interclr presets keys

      interclr presets keys --json | jq '."method.inter.neg_sampling".choices'
    """
    rows = key_table()
    if as_json:
        emit_json({r["key"]: {k: v for k, v in r.items() if k != "key"} for r in rows})
        return
    t = Table(show_header=True, box=None)
    t.add_column("key", style="bold", no_wrap=True)
    t.add_column("default", overflow="fold")
    t.add_column("type / allowed values")
    for r in rows:
        d = r["default"]
        default = '""' if d == "" else str(d).lower() if isinstance(d, bool) else str(d)
        t.add_row(Text(r["key"]), Text(default), Text(" | ".join(r["choices"]) if r["choices"] else r["type"]))
    Console().print(t)
