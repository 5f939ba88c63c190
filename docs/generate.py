"""Write docs/cli.md (every command's --help), docs/catalogue.md (the built-in components) and docs/api.md (the
public plugin API: signatures and docstrings) from the code.

    python docs/generate.py            # rewrite the three files
    python docs/generate.py --check    # exit 1 naming each file that differs from the code

The text comes from the click app and the plugin registry themselves, rendered at a fixed width without
colours and with the built-in plugins only (none installed or set aside by environment variables counts), so
it is the same on every machine. tests/test_docs.py fails when a committed file drifts.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
COMMAND = "python docs/generate.py"
WIDTH = 98  # the help width on any terminal of 100 columns or more (click: min(columns, max_content_width) - 2)


def _builtins() -> Any:
    """A plugin manager of the built-in plugins only, whatever is installed, blocked or registered elsewhere
    in this process."""
    from optiflow.plugins import PluginManager, PluginSelection, load_plugins

    return load_plugins(PluginManager(PluginSelection(load=frozenset())))


def _commands(command: Any, ctx: Any) -> Iterator[tuple[Any, Any]]:
    """The command and, for a group, each subcommand in the order --help lists them, with its context."""
    import click

    yield command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.commands[name]
            if not sub.hidden:
                sub_ctx = click.Context(sub, info_name=name, parent=ctx, terminal_width=WIDTH, **sub.context_settings)
                yield from _commands(sub, sub_ctx)


def cli_reference() -> str:
    """Markdown: the --help of `optiflow` and of every command, as a user sees it on a wide terminal."""
    import click

    from optiflow.cli import cli

    # the top group as a plain click.Group over the built-in commands and the built-in plugins' ones: its own
    # list_commands would add the commands of whatever plugins this process loaded
    top = copy.copy(cli)
    top.__class__ = click.Group
    top.commands = {**_builtins().commands(cli.commands), **cli.commands}
    root = click.Context(top, info_name="optiflow", terminal_width=WIDTH, color=False, **cli.context_settings)
    commands = list(_commands(top, root))
    parts = [
        "# Command-line reference\n",
        f"Generated from the click app by `{COMMAND}`; do not edit by hand (`tests/test_docs.py` fails when "
        "this file and the code differ). The same text is what `optiflow COMMAND --help` prints.\n",
        "\n".join(f"- [`{ctx.command_path}`](#{anchor(ctx.command_path)})" for _, ctx in commands) + "\n",
    ]
    for command, ctx in commands:
        with ctx:
            text = command.get_help(ctx)
        parts.append(f"## {ctx.command_path}\n\n```text\n{click.unstyle(text).rstrip()}\n```\n")
    return "\n".join(parts)


def _cell(value: Any) -> str:
    """A value as a Markdown table cell: code-quoted, pipes escaped."""
    text = str(value).replace("|", "\\|")
    return f"`{text}`" if text else ""


def _text(value: str) -> str:
    """Prose as a Markdown table cell: one line, pipes escaped, angle brackets kept visible (not read as HTML)."""
    return " ".join(value.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _default(value: Any) -> str:
    """A default as it is written on the command line: true/false, [a,b], none, "" for an empty string."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_default(v) for v in value) + "]"
    if value is None:
        return "none"
    return str(value) if value != "" else '""'


def catalogue() -> str:
    """Markdown: every built-in component by kind, with its typed options, defaults and plugin (`optiflow list`)."""
    from optiflow.slots import FAMILIES, SLOTS

    registry = _builtins().registry
    flags = {slot.kind: slot for slot in SLOTS}
    parts = [
        "# Component catalogue\n",
        f"Generated from the plugin registry by `{COMMAND}`; do not edit by hand (`tests/test_docs.py` fails when "
        "this file and the code differ). `optiflow list [KIND]` prints the same, with any installed plugin's "
        "components too.\n",
        "A component is chosen by name and takes options after a colon: `--opt sgd:momentum=0.9,nesterov=true`. "
        "Each option is typed as listed; `A|B` means one of those values; a list is written in brackets "
        "(`hidden=[64,32]`), and so is a `KIND spec`, a component with its own options: "
        "`activation=[leaky-relu:negative_slope=0.1]`.\n",
    ]
    for family in FAMILIES:
        for kind in family.kinds:
            components = registry.select(kind, "*")
            slot = flags.get(kind)
            where = (f"`--{slot.key}`" + (", repeatable" if slot.repeatable else "")) if slot else \
                f"the `{kind}=` option of a model"
            parts.append(f"## {kind}\n\n{len(components)} built-in, chosen by {where}; registered by "
                         f"`{family.hook}`.\n")
            rows = ["| name | options (type = default) | description | plugin |", "|---|---|---|---|"]
            for c in components:
                name = _cell(c.name) + "".join(f" ({_cell(alias)})" for alias in c.aliases)
                options = "<br>".join(f"{_cell(o.name)}: {_cell(o.type_name)} = {_cell(_default(o.default))}"
                                      for o in c.options)
                rows.append(f"| {name} | {options} | {_text(c.description)} | {c.plugin} |")
            parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


#: the public plugin API, by module: what hooks receive and what plugin code and its tests call
PUBLIC_API: dict[str, tuple[str, ...]] = {
    "optiflow.run": ("Run", "ROLES", "RunResult"),
    "optiflow.runlog": ("RunTracker",),
    "optiflow.drawing": ("Recipe",),
    "optiflow.config": ("RunConfig", "ComponentSpec"),
    "optiflow.plan": ("Plan", "Resolved"),
    "optiflow.registry": ("Component", "Option", "Nested"),
    "optiflow.plugins": ("get_registry", "get_plugin_manager", "registered_plugin"),
    "optiflow.data": ("DataContext", "DataSource", "Splits"),
    "optiflow.setup": ("Setup",),
    "optiflow.schedule": ("Schedule", "TrainingLength", "with_warmup"),
    "optiflow.loop": ("evaluate",),
    "optiflow.optim": ("decay_params", "FIRST_ORDER"),
    "optiflow.tracking": ("resolve_tracking_uri", "client"),
    "optiflow.errors": ("OptiflowError",),
    "optiflow.commands.train": ("train",),
}


def api_reference() -> str:
    """Markdown: every public class (fields, properties, methods), function and constant of :data:`PUBLIC_API`,
    with its signature and docstring, as the code has them."""
    parts = [
        "# Plugin API reference\n",
        f"Generated from the code by `{COMMAND}`; do not edit by hand (`tests/test_docs.py` fails when this file "
        "and the code differ). How to use it: [plugins.md](plugins.md). Everything here is stable within 0.x.\n",
        "\n".join(f"- [`{module}`](#{anchor(module)}): " + ", ".join(f"`{name}`" for name in names)
                  for module, names in PUBLIC_API.items()) + "\n",
    ]
    for module_name, names in PUBLIC_API.items():
        module = importlib.import_module(module_name)
        parts.append(f"## {module_name}\n")
        for name in names:
            parts.append(_api_entry(name, getattr(module, name), module))
    return "\n".join(parts)


def _api_entry(name: str, obj: Any, module: Any) -> str:
    if inspect.isclass(obj):
        return _api_class(name, obj)
    if callable(obj) and not isinstance(obj, types.GenericAlias):
        return f"### `{name}{_signature(obj)}`\n\n{_doc(obj)}"
    comment = _constant_comments(module).get(name, "")
    return f"### `{name}`\n\n`{name} = {_constant(obj)}`\n" + (f"\n{comment}\n" if comment else "")


def _constant(value: Any) -> str:
    """A constant as the code writes it: a type alias without module prefixes (``tuple[Component, dict[str, Any]]``)."""
    text = repr(value)
    return re.sub(r"\b(?:[a-z_]+\.)+([A-Za-z_]+)", r"\1", text) if isinstance(value, types.GenericAlias) else text


def _constant_comments(module: Any) -> dict[str, str]:
    """The ``#:`` comment lines right above each module-level assignment of ``module``, joined."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(module).splitlines():
        if line.startswith("#:"):
            pending.append(line[2:].strip())
            continue
        match = re.match(r"^([A-Za-z_]\w*)(?:: [^=]+)? = ", line)
        if match and pending:
            comments[match[1]] = " ".join(pending)
        pending = []
    return comments


def _api_class(name: str, cls: type) -> str:
    kind = "protocol" if getattr(cls, "_is_protocol", False) else "dataclass" if dataclasses.is_dataclass(cls) \
        else "class"
    lines = [f"### {kind} `{name}`\n", _doc(cls)]
    if dataclasses.is_dataclass(cls):
        comments = _field_comments(cls)
        lines.append("| field | type | default | what |\n|---|---|---|---|")
        lines += [f"| `{f.name}` | {_cell(f.type)} | {_cell(_field_default(f))} | {_text(comments.get(f.name, ''))} |"
                  for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        lines.append("")
    for member_name, member in vars(cls).items():
        if member_name.startswith("_") or (dataclasses.is_dataclass(cls) and member_name in cls.__dataclass_fields__):
            continue
        if isinstance(member, property):
            lines.append(f"- **property** `{member_name}`: {_text(inspect.getdoc(member) or '')}")
        elif isinstance(member, (classmethod, staticmethod)) or inspect.isfunction(member):
            function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            prefix = "classmethod " if isinstance(member, classmethod) else ""
            lines.append(f"- {prefix}`{member_name}{_signature(function)}`: {_text(inspect.getdoc(function) or '')}")
        elif not callable(member):
            lines.append(f"- attribute `{member_name} = {member!r}`")
    return "\n".join(lines).rstrip() + "\n"


class _Written(str):
    """An annotation kept as the text the code has (``from __future__ import annotations``), shown unquoted."""

    def __repr__(self) -> str:
        return str(self)


def _signature(function: Any) -> str:
    signature = inspect.signature(function)
    written = {"annotation": _Written(signature.return_annotation)} if isinstance(signature.return_annotation, str) \
        else {}
    parameters = [p.replace(annotation=_Written(p.annotation)) if isinstance(p.annotation, str) else p
                  for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=written.get("annotation",
                                                                                     signature.return_annotation)))


def _doc(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return (doc + "\n") if doc else ""


def _field_default(field: Any) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        made = field.default_factory()
        return str(made) if not isinstance(made, (dict, list)) else repr(made)
    return ""


def _field_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comment lines above each field of ``cls``'s body, or after it on its line, joined."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"^    (\w+): [^#]*(?:#: (.*))?$", line)
        if match and (pending or match[2]):
            comments[match[1]] = " ".join([*pending, match[2] or ""]).strip()
        pending = []
    return comments


def anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    kept = "".join(ch for ch in heading.strip().lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def outputs() -> dict[Path, str]:
    """Each generated file and the text the code gives it now."""
    return {DOCS / "cli.md": cli_reference(), DOCS / "catalogue.md": catalogue(), DOCS / "api.md": api_reference()}


def main(argv: list[str]) -> int:
    generated = outputs()
    if "--check" in argv:
        stale = [path for path, text in generated.items() if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{path.relative_to(ROOT)} differs from the code; run `{COMMAND}`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generated.items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's optiflow, not an installed copy
    sys.exit(main(sys.argv[1:]))
