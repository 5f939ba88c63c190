"""``optiflow export MODEL --onnx FILE``: a logged model as an ONNX file, checked against the program it came from.

The exported program is read as data (:func:`optiflow.export.load_program`, nothing from the store runs) and
converted by ``torch.onnx.export(..., dynamo=True)`` with the batch size left free; the ONNX model takes the
same raw input ``(N, *input_shape)`` float32 and gives the same output (class probabilities, or the target in
its units). Before the file is written, onnxruntime (where installed) runs it on a batch of inputs drawn from
the range the model saw in training and the largest difference to the program must be within ``tolerance``.
Conversion takes seconds, so it is a command of its own rather than a cost on every run.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from optiflow.errors import OptiflowError, first_line

if TYPE_CHECKING:
    import numpy as np
    from torch.export import ExportedProgram

    from optiflow.predict_inputs import ModelSpec

TOLERANCE = 1e-5
CHECK_ROWS = 64


@dataclass
class OnnxExport:
    """Where the ONNX file went, its size, and how far onnxruntime's answers were from the program's
    (None where onnxruntime is not installed: the file passed ``onnx.checker`` only)."""

    path: Path
    size: int
    max_difference: float | None
    checked_rows: int


def export_onnx(model: str, out: str, tracking_uri: str | None = None, tolerance: float = TOLERANCE) -> OnnxExport:
    """Convert ``model`` (a run id, ``runs:/ID/model`` or ``models:/NAME/VERSION``) to ONNX at ``out``."""
    import torch

    from optiflow.commands.predict import model_spec, resolve_model
    from optiflow.export import load_program

    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise OptiflowError("ONNX export needs the onnx and onnxscript packages: pip install \"optiflow[onnx]\"") from None
    uri, label = resolve_model(model, tracking_uri)
    spec = model_spec(uri, label)
    program = load_program(uri)
    with tempfile.TemporaryDirectory(prefix="optiflow-onnx-") as folder:
        staged = os.path.join(folder, "model.onnx")
        try:
            converted = torch.onnx.export(program, dynamo=True, verbose=False)
            if converted is None:
                raise OptiflowError("torch.onnx.export gave no program")
            converted.save(staged)
            onnx.checker.check_model(staged, full_check=True)
        except Exception as exc:  # the converter's own refusal of an operator, worded as it words it
            raise OptiflowError(f"cannot convert {label} to ONNX: {first_line(exc)[:300]}") from None
        sample = check_inputs(spec)
        difference = runtime_difference(staged, program, sample)
        if difference is not None and not difference <= tolerance:
            raise OptiflowError(f"the ONNX model of {label} answers up to {difference:.3g} away from the torch "
                                f"program (tolerance {tolerance:g}); not written")
        data = Path(staged).read_bytes()
    target = Path(out).expanduser()
    try:
        target.write_bytes(data)
    except OSError as exc:
        raise OptiflowError(f"cannot write {target}: {exc.strerror or first_line(exc)}") from None
    return OnnxExport(target, len(data), difference, len(sample))


def check_inputs(spec: ModelSpec) -> np.ndarray:
    """A seeded batch of raw inputs inside the range seen in training (or [0, raw_scale])."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (CHECK_ROWS, *spec.input_shape)
    if spec.input_range:
        low = np.asarray(spec.input_range["low"], dtype=np.float64)
        high = np.asarray(spec.input_range["high"], dtype=np.float64)
        flat = rng.uniform(size=(CHECK_ROWS, low.size)) * (high - low) + low
        return np.broadcast_to(flat.reshape(CHECK_ROWS, *([-1] if low.size > 1 else [1])),
                               (CHECK_ROWS, int(np.prod(spec.input_shape)))).reshape(shape).astype(np.float32)
    return (rng.uniform(size=shape) * float(spec.raw_scale or 1.0)).astype(np.float32)


def runtime_difference(path: str, program: ExportedProgram, sample: np.ndarray) -> float | None:
    """The largest absolute difference between onnxruntime's and the program's outputs on ``sample``."""
    import numpy as np
    import torch

    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    [given] = session.run(None, {session.get_inputs()[0].name: sample})
    with torch.no_grad():
        expected = program.module()(torch.from_numpy(np.ascontiguousarray(sample))).numpy()
    return float(np.abs(given - expected).max())
