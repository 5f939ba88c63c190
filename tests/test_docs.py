"""The documentation stays true: the generated references match the code, every link lands, the README is
the short opening CI and newcomers rely on, and CONTRIBUTING's layout names the modules that exist."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LINKED_PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md")),
                ROOT / "examples" / "README.md", ROOT / "examples" / "plugin-example" / "README.md"]


def _load_generator():
    spec = importlib.util.spec_from_file_location("optiflow_docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


# --- the generated references -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cli.md", "catalogue.md", "api.md"])
def test_generated_reference_matches_the_code(name):
    path = DOCS / name
    expected = generate.outputs()[path]
    committed = path.read_text() if path.exists() else ""
    if committed != expected:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), expected.splitlines(True),
                                                 f"docs/{name} (committed)", f"docs/{name} (from the code)"))[:60])
        pytest.fail(f"docs/{name} differs from the code: run `{generate.COMMAND}` and commit the result\n{diff}")


def test_the_cli_reference_holds_every_command_and_option():
    from optiflow.cli import cli

    text = generate.cli_reference()
    for name, command in cli.commands.items():
        assert f"\n## optiflow {name}\n" in text, f"optiflow {name} is missing from docs/cli.md"
        for parameter in command.params:
            for flag in parameter.opts if parameter.param_type_name == "option" else []:
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{flag} of {name} is missing"


def test_the_api_reference_holds_every_public_member_with_its_signature():
    import dataclasses
    import importlib
    import inspect

    text = generate.api_reference()
    for module_name, names in generate.PUBLIC_API.items():
        for name in names:
            obj = getattr(importlib.import_module(module_name), name)
            if not inspect.isclass(obj):
                assert f"### `{name}" in text, f"{module_name}.{name} is missing from docs/api.md"
                continue
            fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
            members = {m for m in vars(obj) if not m.startswith("_")} | fields
            for member in members - {"registry"} if name == "Component" else members:
                assert f"`{member}" in text, f"{name}.{member} is missing from docs/api.md"
    documented = text.split("### dataclass `Run`")[1].split("### `ROLES`")[0]
    assert "|  |\n" not in documented and "`: \n" not in documented, "a Run field or method has no description"
    assert "`log_figure(self, figure: Figure | drawing.Recipe, artifact_file: str) -> None`" in text, "signatures as written"


def test_the_catalogue_holds_every_builtin_component_with_its_options():
    text = generate.catalogue()
    registry = generate._builtins().registry
    sections = {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}
    for kind in registry.components:
        assert kind in sections, f"docs/catalogue.md has no section for {kind}"
        for component in registry.select(kind, "*"):
            rows = sections[kind].splitlines()
            row = next((line for line in rows if line.startswith(f"| `{component.name}`")), None)
            assert row is not None, f"{kind} {component.name} is missing from docs/catalogue.md"
            for option in component.options:
                assert f"`{option.name}`: " in row, f"option {option.name} of {component.name} is missing"
            assert row.endswith(f"| {component.plugin} |")


def test_the_generator_follows_the_code(monkeypatch):
    """A changed help text and a new component both change the generated text (the drift test can fail)."""
    from optiflow import hookimpl
    from optiflow.cli import cli

    monkeypatch.setattr(cli.commands["train"], "help", "Train, as this test rewrote it.")
    assert "Train, as this test rewrote it." in generate.cli_reference()

    class Extra:
        @hookimpl
        def optiflow_register_optimizers(self, register):
            def drifted(model, *, lr: float = 0.5, tilt: int = 3):
                """An optimizer the committed catalogue does not know."""

            register("drifted", drifted)

    pm = generate._builtins()
    pm.register(Extra(), name="extra")
    pm.invalidate()
    monkeypatch.setattr(generate, "_builtins", lambda: pm)
    row = next(line for line in generate.catalogue().splitlines() if line.startswith("| `drifted`"))
    assert "`lr`: `float` = `0.5`<br>`tilt`: `int` = `3`" in row and row.endswith("| extra |")


def test_plugins_loaded_or_blocked_in_the_process_do_not_leak_into_the_reference(monkeypatch):
    import click

    from optiflow import hookimpl
    from optiflow.plugins import get_registry, registered_plugin

    class Loaded:
        @hookimpl
        def optiflow_register_optimizers(self, register):
            register("leaked", lambda model, *, lr=0.1: None, description="A plugin optimizer.")

        @hookimpl
        def optiflow_register_commands(self, cli):
            cli.add_command(click.Command("leaked-command", help="A plugin command."))

    committed = {path: path.read_text() for path in generate.outputs()}
    with registered_plugin(Loaded(), "loaded"):
        assert get_registry().get("optimizer", "leaked")
        assert generate.outputs() == committed
    monkeypatch.setenv("OPTIFLOW_DISABLE_PLUGINS", "optimizers")
    monkeypatch.setenv("OPTIFLOW_LOAD_PLUGINS", "")
    assert generate.outputs() == committed


def test_check_names_each_drifted_file_and_the_command_that_mends_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()

    assert generate.main(["--check"]) == 1
    missing = capsys.readouterr().err.splitlines()
    assert missing == [f"docs/{name} differs from the code; run `python docs/generate.py`"
                       for name in ("cli.md", "catalogue.md", "api.md")]
    assert generate.main([]) == 0
    assert generate.main(["--check"]) == 0
    catalogue = tmp_path / "docs" / "catalogue.md"
    catalogue.write_text(catalogue.read_text().replace("| `adam` |", "| `adam2` |"))
    capsys.readouterr()
    assert generate.main(["--check"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "docs/catalogue.md differs from the code; run `python docs/generate.py`"]


def test_the_documented_command_gives_the_same_text_on_any_terminal(tmp_path):
    """`python docs/generate.py --check` passes in a narrow, colour-forcing terminal as on CI."""
    env = {**os.environ, "COLUMNS": "40", "LINES": "10", "FORCE_COLOR": "1", "CLICOLOR_FORCE": "1", "TERM": "xterm-256color",
           "OPTIFLOW_DISABLE_PLUGINS": "models"}
    done = subprocess.run([sys.executable, "docs/generate.py", "--check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- links -------------------------------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code spans removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r" ", "-", "".join(ch for ch in text if ch.isalnum() or ch in " -_"))


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file offers: its headings (duplicates numbered as GitHub does) and <a> tags."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    for line in lines:
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            found.add(base if base not in counts else f"{base}-{counts[base]}")
            counts[base] = counts.get(base, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file does not exist or whose #anchor no heading of it gives."""
    broken = []
    for line in prose_lines(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, fragment = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{target} (no such file)")
            elif fragment and (linked.suffix != ".md" or fragment not in anchors(linked)):
                broken.append(f"{target} (no such anchor)")
    return broken


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_lands(page):
    assert broken_links(page) == [], f"broken links in {page.relative_to(ROOT)}"


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Twice\n\n## Twice\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("# Page: `one`, two\n\n[ok](other.md#other-page) [ok](other.md#twice-1) [ok](#page-one-two)\n"
                    "[gone](missing.md) [bad](other.md#not-a-heading) [bad](#nowhere) [web](https://x.org/#y)\n"
                    "`[code](not-checked.md)`\n```text\n[fenced](not-checked.md)\n```\n")
    assert broken_links(page) == ["missing.md (no such file)", "other.md#not-a-heading (no such anchor)",
                                  "#nowhere (no such anchor)"]


# --- the commands the pages show --------------------------------------------------------------------------

SHELL_BREAKS = {"|", ">", ">>", "2>", "&&", "||", ";"}


def optiflow_commands(page: Path) -> list[list[str]]:
    """The arguments of every optiflow command line in the page's bash blocks (`optiflow ...`,
    `.venv/bin/optiflow ...`, `torchrun ... -m optiflow ...`), continuation lines joined."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            segment: list[str] = []
            for word in [*shlex.split(line, comments=True), ";"]:
                if word not in SHELL_BREAKS:
                    segment.append(word)
                    continue
                starts = [i for i, w in enumerate(segment)
                          if w == "optiflow" and i and segment[i - 1] == "-m" or w.endswith("bin/optiflow")
                          or (w == "optiflow" and i == 0)]
                if starts:
                    found.append(segment[starts[0] + 1:])
                segment = []
    return found


def unparsable(args: list[str]) -> str | None:
    """Why click's parser refuses these arguments of ``optiflow`` (an unknown command or option, a stray
    argument), or None. Only the words are parsed: no value is converted and no callback runs, so a page may
    show placeholders such as ``3f2a...`` or files it does not ship."""
    import click

    from optiflow.cli import cli

    ctx = click.Context(cli, info_name="optiflow")
    try:
        _, rest, _ = cli.make_parser(ctx).parse_args(list(args))
        if not rest:
            return None
        command = cli.get_command(ctx, rest[0])
        if command is None:
            return f"no command {rest[0]!r}"
        _, extra, _ = command.make_parser(click.Context(command, info_name=rest[0], parent=ctx)).parse_args(rest[1:])
    except click.UsageError as exc:
        return exc.format_message()
    return f"unexpected arguments {extra}" if extra else None


COMMAND_PAGES = [page for page in LINKED_PAGES if page.name != "cli.md"]


@pytest.mark.parametrize("page", COMMAND_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_a_page_shows_parses(page):
    wrong = {" ".join(args): why for args in optiflow_commands(page) if (why := unparsable(args))}
    assert wrong == {}, f"{page.relative_to(ROOT)} shows commands optiflow refuses"


def test_the_command_check_finds_a_renamed_flag_and_a_missing_command(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\noptiflow train --opt adam --epochs 2   # fine\n"
                    "optiflow train --optimizer adam > out.txt\n.venv/bin/optiflow trian\n"
                    "torchrun --nnodes 2 \\\n    -m optiflow search --space lr=loguniform:1e-4:1e-1 --n-trails 3\n"
                    "pip install x && optiflow --disable-plugin example list optimizer extra\n```\n")
    commands = optiflow_commands(page)
    assert commands[0] == ["train", "--opt", "adam", "--epochs", "2"]
    verdicts = [unparsable(args) for args in commands]
    assert verdicts[0] is None and verdicts[2:3] == ["no command 'trian'"], verdicts
    assert "'--optimizer'" in verdicts[1] and "'--n-trails'" in verdicts[3], verdicts
    assert verdicts[4] == "unexpected arguments ['extra']"


# --- the README and CONTRIBUTING ---------------------------------------------------------------------------


def test_readme_is_short_and_opens_with_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 300, f"README.md has {len(readme)} lines; move reference text to docs/"
    assert any("optiflow train" in line for line in readme[:40])
    opening = "\n".join(readme)
    first_block = re.search(r"```bash\n(.*?)```", opening, flags=re.S).group(1).strip().splitlines()
    assert first_block == ['python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/optiflow train',
                           ".venv/bin/python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in first_block:
        assert command in ci, f".ci/run does not run the README's command: {command}"


def test_readme_tours_every_command_a_newcomer_needs():
    readme = (ROOT / "README.md").read_text()
    for command in ("train", "compare", "search", "predict", "ui", "plugins"):
        assert re.search(rf"^optiflow {command}\b", readme, flags=re.M), f"the README shows no `optiflow {command}`"
    for page in ("cli.md", "catalogue.md", "performance.md", "cluster.md", "failures.md", "plugins.md"):
        assert f"](docs/{page}" in readme, f"the README does not link docs/{page}"


def layout_names() -> set[str]:
    """The paths CONTRIBUTING.md's layout block names under optiflow/, relative to optiflow/."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = re.search(r"```\noptiflow/\n(.*?)```", text, flags=re.S).group(1)
    names = set()
    for line in block.splitlines():
        if line.startswith("  ") and not line.startswith("   "):  # a module's line, not a continuation
            for word in line.split():
                if not word.rstrip(",").endswith((".py", "/")):
                    break
                names.add(word.rstrip(","))
    return names


def test_contributing_layout_names_every_module_of_the_core():
    named = layout_names()
    core = ROOT / "optiflow"
    present = {p.name for p in core.glob("*.py") if not p.name.startswith("__")}
    present |= {f"{p.name}/" for p in core.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert sorted(present - named) == [], "CONTRIBUTING.md's layout does not name these modules"
    assert sorted(named - present) == [], "CONTRIBUTING.md's layout names modules that do not exist"


def test_contributing_says_how_to_regenerate_the_docs():
    assert generate.COMMAND in (ROOT / "CONTRIBUTING.md").read_text()


def test_the_package_version_is_the_release_the_changelog_prepares():
    """Runs are tagged ``optiflow.version``; docs/results.md dates metric changes by release ("before 0.2.0"):
    the version in pyproject.toml is the [Unreleased] release of CHANGELOG.md (as a .devN) or a released one."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    heading = re.search(r"^## \[Unreleased\] — (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert heading is not None
    assert version.startswith(f"{heading.group(1)}.dev"), f"pyproject.toml says {version}, CHANGELOG prepares " \
                                                         f"{heading.group(1)}"
