"""The ``optiflow predict`` and ``optiflow export`` click commands (thin, like those in cli.py, which registers them
on the group)."""

from __future__ import annotations

import os
import sys

import click


@click.command()
@click.argument("model")
@click.option("--input", "input_path", required=True, metavar="PATH",
              help="A CSV with a header (the training feature columns by name; a target column is used to score), "
                   "a .npy array, an image file or a folder of images (resized as in training). Values are raw: "
                   "as the dataset's source holds them (digits 0..16, pixels 0..255, the CSV's units).")
@click.option("--target", metavar="COLUMN",
              help="The CSV's column of labels (or values), to score the predictions [the model's target column].")
@click.option("--output", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the predictions CSV here [stdout when it is not a terminal].")
@click.option("--tracking-uri", help="Store holding the run [$MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db].")
@click.option("--quiet", "-q", is_flag=True, help="No table or score, only errors.")
def predict(model: str, input_path: str, output: str | None, tracking_uri: str | None, target: str | None,
            quiet: bool) -> None:
    """Predict with a logged model: MODEL is a run id, runs:/ID/model or models:/NAME/VERSION.

    The CSV has the input's row id (its `id` column, else the row number; the file name for
    images), `prediction` (the class name, or the value) and one `prob_<class>` column per class.
    Images convert between grayscale and RGB to the model's channels.

    \b
    optiflow predict 3f2a9c... --input flowers.csv --output predictions.csv
    optiflow predict runs:/3f2a9c.../model --input digits.npy > predictions.csv
    optiflow predict 3f2a9c... --input digits.csv --target label   # prints the accuracy
    """
    from optiflow import host
    from optiflow.commands.predict import predict as run_prediction
    from optiflow.commands.predict import write_predictions

    host.imports_done()  # the collector's pause ends before the input is read: its rows are collected as usual
    result = run_prediction(model, input_path, tracking_uri, target)
    if not result.spec.raw_input:
        click.echo("warning: this model takes normalized inputs (its normalizer could not be part of it), "
                   "so raw values give wrong predictions", err=True)
    if result.out_of_range is not None:
        click.echo(f"warning: {result.out_of_range.message()}", err=True)
    if result.ignored is not None and not quiet:
        click.echo(f"note: {result.ignored}", err=True)
    terminal = sys.stdout.isatty()
    if output is None and not terminal:
        try:
            write_predictions(result, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        if result.score is not None and not quiet:
            score = result.score
            click.echo(f"{score.name} {score.value:.4f} on {score.rows} labelled rows", err=True)
        return
    if output is not None:
        write_predictions(result, output)
    if not quiet:
        from optiflow.console import print_predictions

        print_predictions(result, output)


@click.command("export")
@click.argument("model")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the model as ONNX here (raw input (N, *input_shape) float32, the same outputs).")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="Largest difference allowed between onnxruntime's answers and the torch program's "
                   "(absolute for outputs up to 1, relative above).")
@click.option("--tracking-uri", help="Store holding the run [$MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db].")
@click.option("--quiet", "-q", is_flag=True, help="No summary line, only errors.")
def export(model: str, onnx_path: str, tolerance: float, tracking_uri: str | None, quiet: bool) -> None:
    """Convert a logged model to ONNX: MODEL is a run id, runs:/ID/model or models:/NAME/VERSION.

    The model is read as data (no code from the store runs), converted with torch.onnx, and checked
    with onnxruntime on inputs from its training range before the file is written.

    \b
    optiflow export 3f2a9c... --onnx digits.onnx
    """
    from optiflow import host
    from optiflow.commands.onnx_export import export_onnx

    host.imports_done()  # the collector's pause ends before the model is read
    result = export_onnx(model, onnx_path, tracking_uri, tolerance)
    if not quiet:
        check = ("onnxruntime not installed: checked with onnx.checker only" if result.max_difference is None
                 else f"onnxruntime within {result.max_difference:.2g} of the torch program on {result.checked_rows} rows")
        click.echo(f"wrote {result.path} ({result.size:,} bytes); {check}", err=True)
