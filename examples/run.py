"""Reproduce the classic experiments: run each example's optiflow commands into MLflow, then draw its picture.

    python examples/run.py                    # every example at full size (pictures go into examples/NN-*/)
    python examples/run.py 08-optimizers      # one example (a unique prefix such as 08 is enough)
    python examples/run.py all --quick        # every example at reduced size, into outputs/examples/
    python examples/run.py --list             # what there is

Each example is a folder holding ``example.yaml``: the ``optiflow`` command lines that make its runs, the
flags ``--quick`` appends to shrink them, and the picture drawn from those runs (read back with MlflowClient).
The runs of example ``NN-name`` land in the MLflow experiment ``examples-NN-name``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EXAMPLES_DIR = Path(__file__).resolve().parent
ROOT = EXAMPLES_DIR.parent
QUICK_OUT = ROOT / "outputs" / "examples"


class ExampleError(Exception):
    """An example could not run or could not draw its picture."""


@dataclass(frozen=True)
class Example:
    """One reproduced experiment, as its ``example.yaml`` describes it."""

    name: str
    folder: Path
    title: str
    claim: str
    commands: list[str]
    picture: dict[str, Any]
    quick: str = ""
    data_dir_flags: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def experiment(self) -> str:
        return f"examples-{self.name}"

    def argv(self, command: str, *, quick: bool, data_dir: str | None) -> list[str]:
        """The optiflow arguments of one command line, with the quick / data-dir flags appended; every command that
        trains trains anew (``--no-reuse``), so that the picture is drawn from this invocation's own runs."""
        words = shlex.split(command)
        if not words or words[0] != "optiflow":
            raise ExampleError(f"{self.name}: every command must start with 'optiflow', got {command!r}")
        extra = shlex.split(self.quick) if quick else []
        if data_dir:
            if not self.data_dir_flags:
                raise ExampleError(f"{self.name} reads no files, so --data-dir does not apply to it")
            extra += [*shlex.split(self.data_dir_flags), "--data-dir", data_dir]
        fresh = ["--no-reuse"] if words[1:2] in (["train"], ["compare"], ["search"]) else []
        return [*words[1:], *fresh, *extra, "--experiment", self.experiment]


def load_examples(folder: Path = EXAMPLES_DIR) -> list[Example]:
    """Every ``NN-name/example.yaml`` under ``folder``, in number order."""
    examples = []
    for path in sorted(folder.glob("[0-9][0-9]-*/example.yaml")):
        spec = yaml.safe_load(path.read_text())
        commands = spec.pop("commands")
        examples.append(Example(
            name=path.parent.name,
            folder=path.parent,
            title=spec.pop("title"),
            claim=" ".join(spec.pop("claim").split()),
            commands=[" ".join(c.split()) for c in commands],
            picture=spec.pop("picture"),
            quick=spec.pop("quick", ""),
            data_dir_flags=spec.pop("data_dir_flags", ""),
            notes=spec,
        ))
    return examples


def select(examples: list[Example], names: list[str]) -> list[Example]:
    """The examples named (``all``, a full name or a unique prefix such as ``08``)."""
    if not names or names == ["all"]:
        return examples
    chosen = []
    for name in names:
        matches = [e for e in examples if e.name == name] or [e for e in examples if e.name.startswith(name)]
        if len(matches) != 1:
            known = ", ".join(e.name for e in examples)
            raise ExampleError(f"no single example matches {name!r}; choose from {known}")
        chosen.append(matches[0])
    return chosen


def run_example(example: Example, tracking_uri: str, *, quick: bool = False, data_dir: str | None = None,
                out_dir: Path | None = None, redraw: bool = False) -> dict[str, Any]:
    """Run the example's commands into ``tracking_uri``, then save its picture and finding; returns the numbers.

    With ``redraw`` nothing is trained: the picture is drawn again from the runs of the last invocation.
    """
    from mlflow.tracking import MlflowClient
    from pictures import draw  # examples/pictures.py, next to this file

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    out = out_dir or (QUICK_OUT / example.name if quick else example.folder)
    scratch = QUICK_OUT / example.name if out_dir is None else out_dir
    scratch.mkdir(parents=True, exist_ok=True)
    last_invocation = scratch / f"last-{'quick' if quick else 'full'}-invocation.json"
    if redraw:
        if not last_invocation.exists():
            raise ExampleError(f"{example.name} has not run here yet, so there is nothing to redraw")
        invocation = json.loads(last_invocation.read_text())
    else:
        data_dir = str(Path(data_dir).resolve()) if data_dir else None
        invocation = {"started_ms": int(time.time() * 1000), "tracking_uri": tracking_uri}
        with _working_directory(scratch):  # compare's own plots and tables land in scratch/compare/
            for command in example.commands:
                _optiflow(example.argv(command, quick=quick, data_dir=data_dir), example.name)
        invocation["finished_ms"] = int(time.time() * 1000)
        last_invocation.write_text(json.dumps(invocation))
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(example.experiment)
    if experiment is None:
        raise ExampleError(f"{example.name}: its commands logged no runs")
    # the runs this invocation started: not a later `optiflow reproduce` of one of them, logged beside them
    window = f"attributes.start_time >= {invocation['started_ms']}" + (
        f" AND attributes.start_time <= {invocation['finished_ms']}" if "finished_ms" in invocation else "")
    runs = client.search_runs([experiment.experiment_id], window, order_by=["attributes.start_time ASC"],
                              max_results=5000)
    figure, numbers = draw(client, runs, example.picture, title=example.title)
    out.mkdir(parents=True, exist_ok=True)
    picture = out / f"{example.name}.png"
    figure.savefig(picture, dpi=100)
    (out / "finding.md").write_text(finding_markdown(example, numbers, quick=quick))
    return {"picture": picture, "numbers": numbers, "runs": len(runs)}


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _optiflow(argv: list[str], name: str) -> None:
    """Run one optiflow command in this process (imports and the registry are paid once for all examples)."""
    from optiflow.cli import cli

    print(f"[{name}] optiflow {shlex.join(argv)}", flush=True)
    try:
        cli.main(argv, prog_name="optiflow")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise ExampleError(f"{name}: 'optiflow {shlex.join(argv)}' exited with {exc.code}") from None


def finding_markdown(example: Example, numbers: dict[str, Any], *, quick: bool) -> str:
    """The measured numbers as a Markdown table: one row per variant, one column per quantity."""
    rows = numbers["rows"]
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    lines = [
        f"# {example.title}",
        "",
        f"Tutorial's claim: {example.claim}",
        "",
        f"Measured by `python examples/run.py {example.name}{' --quick' if quick else ''}`"
        f" ({'reduced size' if quick else 'full size'}):",
        "",
        "| variant | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for variant, row in rows.items():
        lines.append(f"| {variant} | " + " | ".join(_format(row.get(c)) for c in columns) + " |")
    if "intervals" in numbers:
        lines += ["", *interval_lines(numbers["intervals"])]
    return "\n".join(lines) + "\n"


def interval_lines(found: dict[str, Any]) -> list[str]:
    """The comparison's confidence, as its parent run logged it: one row per variant (mean, 95% t-interval,
    paired t-test against the baseline), then which differences are significant at 5%."""
    metric, baseline = found["metric"], found["baseline"]
    lines = [f"Over {found['repeats']} seeds (`compare --repeats {found['repeats']}`; values as the comparison's "
             f"parent run logged them): {metric}, its mean and 95% t-interval, and a two-sided paired t-test "
             f"against {baseline} over the same seeds.", "",
             f"| variant | seeds | {metric} mean | 95% interval | difference to {baseline} | p | significant at 5% |",
             "|---|---|---|---|---|---|---|"]
    significant, not_significant = [], []
    for variant, row in found["rows"].items():
        interval = f"[{_format(row['low'])}, {_format(row['high'])}]" if row["low"] is not None else "–"
        if variant == baseline:
            versus = ["baseline", "–", "–"]
        elif "p" in row:
            versus = [f"{row['difference']:+.4g}", f"{row['p']:.2g}", "yes" if row["significant"] else "no"]
            (significant if row["significant"] else not_significant).append(f"{variant} ({row['difference']:+.3g})")
        else:
            versus = ["–", "–", "–"]
        lines.append(f"| {variant} | {len(row['seeds'])} | {_format(row['mean'])} | {interval} | " + " | ".join(versus)
                     + " |")
    lines += ["", f"Differences to {baseline} significant at 5%: {', '.join(significant) or 'none'}; "
                  f"not significant: {', '.join(not_significant) or 'none'}."]
    return lines


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="examples to run: 'all' (default), a name or a unique prefix")
    parser.add_argument("--quick", action="store_true", help="reduced size (fewer epochs, points and trials)")
    parser.add_argument("--data-dir", help="folder with FashionMNIST in its standard layout (example 11)")
    parser.add_argument("--tracking-uri", help="MLflow store [$MLFLOW_TRACKING_URI or the project's mlruns/]")
    parser.add_argument("--out", type=Path, help="where pictures and findings go [the example's folder; "
                                                 "outputs/examples/ with --quick]")
    parser.add_argument("--redraw", action="store_true", help="train nothing: redraw the pictures from the runs "
                                                              "of the last invocation")
    parser.add_argument("--list", action="store_true", help="list the examples and exit")
    args = parser.parse_args(argv)
    examples = load_examples()
    if args.list:
        for example in examples:
            print(f"{example.name:28} {example.title}")
        return 0
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT}/mlruns/mlflow.db"
    try:
        chosen = select(examples, args.names)
        for example in chosen:
            started = time.perf_counter()
            out = args.out / example.name if args.out else None
            result = run_example(example, tracking_uri, quick=args.quick, data_dir=args.data_dir, out_dir=out,
                                 redraw=args.redraw)
            print(f"[{example.name}] {result['runs']} runs, picture {result['picture']} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    except ExampleError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import logging

    sys.path.insert(0, str(EXAMPLES_DIR))
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.exit(main())
