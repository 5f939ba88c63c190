"""A logged model's exported program (``data/model.pt2``), read as data: nothing in the file runs.

``torch.export.load`` trusts its file: it unpickles weights, constants and sample inputs with
``weights_only=False`` (a pickle planted in the archive runs on load), hands the program's symbolic
shapes to ``sympy.sympify`` (which evaluates strings) and resolves graph targets by walking ``torch``'s
attributes.  :func:`load_program` reads the same archive without any of that: tensors through torch's
restricted unpickler (``weights_only=True``) or as raw bytes, the program's JSON only after every
string in it passed a check of what it may hold, and the rebuilt graph only when each call is a torch
operator.  Anything else is refused with :class:`UnsafeModel`, naming the entry.
"""

from __future__ import annotations

import io
import json
import operator
import re
import zipfile
from typing import TYPE_CHECKING

from optiflow.errors import OptiflowError

if TYPE_CHECKING:
    from torch import Tensor
    from torch.export import ExportedProgram

MODEL_NAME = "model"
# A graph call: a torch operator overload (namespace.op[.overload]) or a Python operator/math function.
CALL_TARGET = re.compile(r"^(torch\.ops(\.[A-Za-z][A-Za-z0-9_]*){2,3}|_operator\.[a-z_]+|math\.[a-z_0-9]+)$")
# Names, dotted paths and plain values: no quotes, brackets, newlines or '#', so nothing can leave a string or
# a comment in the Python that torch.fx generates from the graph.
PLAIN = re.compile(r"^[A-Za-z0-9_.,;:+\-*/ ]*$")
# The symbolic-shape expressions torch writes: Symbol('s77', positive=True, integer=True), s0 + 1, FloorDiv(s0, 2) ...
EXPRESSION_TOKEN = re.compile(r"\s*(?:'[A-Za-z0-9_]+'|\d+(?:\.\d+)?(?:e[+-]?\d+)?|[A-Za-z_][A-Za-z0-9_]*|\*\*|//|[<>=!]=|[-+*/%(),<>=])")
EXPRESSION_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "oo", "True", "False", "Max", "Min", "Abs", "floor", "ceiling",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "nonzero", "commutative",
}
SYMBOL_NAME = re.compile(r"^[a-z]+\d+$")
# Keys whose strings are not plain names: checked by their own rule (or dropped: stack traces become FX comments).
DROPPED_KEYS = {"stack_trace"}


class UnsafeModel(OptiflowError):
    """The model file holds something that cannot be read without running it."""


def load_program(path: str, label: str | None = None) -> ExportedProgram:
    """The exported program in the ``.pt2`` archive at ``path``, rebuilt from data alone; messages
    name it ``label`` (the model's URI) where given."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass

    name = label or path
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise UnsafeModel(f"{name} is not a readable model archive ({exc})") from None
    with archive:
        entries = Entries(archive, name)
        program_json = entries.json(f"models/{MODEL_NAME}.json")
        check_program(program_json, name)
        serialized = _bytes_to_dataclass(schema.ExportedProgram, json.dumps(program_json).encode())
        state_dict = entries.payload("weights", f"data/weights/{MODEL_NAME}_weights_config.json")
        constants = entries.payload("constants", f"data/constants/{MODEL_NAME}_constants_config.json")
        sample_inputs = entries.tensors(f"data/sample_inputs/{MODEL_NAME}.pt")
        if not isinstance(sample_inputs, tuple):
            raise UnsafeModel(f"{name}: its sample inputs are not a tuple of tensors")
    try:
        program = ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, sample_inputs)
    except Exception as exc:  # a malformed program: torch's own checks, worded as torch words them
        raise UnsafeModel(f"{name}: the exported program cannot be rebuilt ({type(exc).__name__}: {exc})") from None
    check_calls(program, name)
    return program


class Entries:
    """The archive's records, by their name under the archive's top folder."""

    def __init__(self, archive: zipfile.ZipFile, path: str) -> None:
        self.archive = archive
        self.path = path
        names = archive.namelist()
        roots = {name.split("/", 1)[0] for name in names if "/" in name}
        if len(roots) != 1:
            raise UnsafeModel(f"{path} is not a torch.export archive (expected one top folder)")
        self.root = roots.pop()
        self.names = {name.split("/", 1)[1] for name in names if "/" in name}

    def read(self, name: str) -> bytes:
        if name not in self.names:
            raise UnsafeModel(f"{self.path} has no '{name}': not a model exported by optiflow")
        return self.archive.read(f"{self.root}/{name}")

    def json(self, name: str) -> dict:
        try:
            value = json.loads(self.read(name))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnsafeModel(f"{self.path}: '{name}' is not JSON ({exc})") from None
        if not isinstance(value, dict):
            raise UnsafeModel(f"{self.path}: '{name}' is not a JSON object")
        return value

    def tensors(self, name: str) -> object:
        """A pickle of tensors and plain containers, through torch's restricted unpickler."""
        import torch

        try:
            return torch.load(io.BytesIO(self.read(name)), weights_only=True, map_location="cpu")
        except UnsafeModel:
            raise
        except Exception:
            raise UnsafeModel(f"refused {self.path}: '{name}' holds Python objects other than tensors, "
                              "which cannot be loaded without running code from the file") from None

    def payload(self, kind: str, config_name: str) -> dict[str, Tensor]:
        """Weights or constants by their names: raw tensor records, or tensor pickles read as tensors."""
        import torch
        from torch._export.serde.serialize import deserialize_scalar_type

        config = self.json(config_name).get("config")
        if not isinstance(config, dict):
            raise UnsafeModel(f"{self.path}: '{config_name}' has no 'config' mapping")
        folder = f"data/{kind}/"
        values: dict[str, torch.Tensor] = {}
        for fqn, meta in config.items():
            file = meta.get("path_name") if isinstance(meta, dict) else None
            if not isinstance(file, str) or not PLAIN.match(fqn) or not PLAIN.match(file):
                raise UnsafeModel(f"{self.path}: '{config_name}' has a malformed entry for '{fqn}'")
            if not file.startswith(("weight_", "tensor_")):
                raise UnsafeModel(f"refused {self.path}: {kind} entry '{file}' is a Python object, not a tensor, "
                                  "and cannot be loaded without running code from the file")
            if meta.get("use_pickle"):
                loaded = self.tensors(folder + file)
                if not isinstance(loaded, torch.Tensor):
                    raise UnsafeModel(f"{self.path}: {kind} entry '{file}' is not a tensor")
                value = loaded
            else:
                value = raw_tensor(self.read(folder + file), meta, deserialize_scalar_type)
            values[fqn] = torch.nn.Parameter(value, requires_grad=False) if meta.get("is_param") else value
        return values


def raw_tensor(data: bytes, meta: dict, scalar_type: object) -> Tensor:
    """A tensor from its raw bytes and the sizes, strides and dtype its config gives."""
    import torch

    tensor_meta = meta.get("tensor_meta") or {}
    try:
        dtype = scalar_type(tensor_meta["dtype"])  # type: ignore[operator]
        sizes = [int(s["as_int"]) for s in tensor_meta["sizes"]]
        strides = [int(s["as_int"]) for s in tensor_meta["strides"]]
        offset = int(tensor_meta.get("storage_offset", {}).get("as_int", 0))
    except (KeyError, TypeError, ValueError):
        raise UnsafeModel(f"a tensor record has malformed metadata: {tensor_meta!r:.200}") from None
    flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.zeros(0, dtype=dtype)
    needed = offset + sum((size - 1) * stride for size, stride in zip(sizes, strides)) + 1 if all(sizes) else 0
    if needed > flat.numel():
        raise UnsafeModel(f"a tensor record holds {flat.numel()} values where its shape {sizes} needs {needed}")
    return torch.as_strided(flat, sizes, strides, offset).clone()


def check_program(program: dict, path: str) -> None:
    """Every string in the program's JSON is a plain name, a torch operator or a shape expression;
    stack traces (comments only) are dropped."""
    def walk(value: object, key: str | None) -> None:
        if isinstance(value, dict):
            for name in [k for k in value if k in DROPPED_KEYS]:
                value[name] = None
            for name, item in value.items():
                if not isinstance(name, str) or not PLAIN.match(name):
                    raise refused(name)
                walk(item, name)
        elif isinstance(value, list):
            for item in value:
                walk(item, key)
        elif isinstance(value, str) and not plain_string(value, key):
            raise refused(value)

    def refused(value: object) -> UnsafeModel:
        return UnsafeModel(f"refused {path}: its program holds {str(value)[:80]!r} where a name, a torch operator "
                           "or a shape expression belongs")

    walk(program, None)


def plain_string(value: str, key: str | None) -> bool:
    if key == "target":
        return bool(CALL_TARGET.match(value)) and "__" not in value
    if key == "expr_str":
        return shape_expression(value)
    if key in ("in_spec", "out_spec"):
        return tree_spec(value)
    return bool(PLAIN.match(value))


def shape_expression(text: str) -> bool:
    """A sympy expression made of numbers, symbols (``s0``), torch's shape functions and operators only:
    no attribute access, no other names, so ``sympify`` can only build an expression."""
    from torch.utils._sympy import functions as shape_functions

    functions = set(getattr(shape_functions, "__all__", ()))
    position = 0
    while position < len(text.rstrip()):
        match = EXPRESSION_TOKEN.match(text, position)
        if not match:
            return False
        token = match.group().strip()
        if (token[0].isalpha() or token[0] == "_") and not (
                token in EXPRESSION_NAMES or token in functions or SYMBOL_NAME.match(token)):
            return False
        position = match.end()
    return True


def tree_spec(text: str) -> bool:
    """A pytree spec: JSON whose node types are ones torch's pytree registry knows."""
    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    try:
        version, spec = json.loads(text)
    except (ValueError, TypeError):
        return False

    def known(node: object) -> bool:
        if not isinstance(node, dict):
            return False
        kind = node.get("type")
        context = node.get("context")
        children = node.get("children_spec", [])
        return ((kind is None or kind in SERIALIZED_TYPE_TO_PYTHON_TYPE)
                and (context is None or (isinstance(context, str) and context_data(context)))
                and isinstance(children, list) and all(known(child) for child in children))

    return isinstance(version, int) and known(spec)


def context_data(context: str) -> bool:
    """A pytree node's context is JSON data (``null``, a list of keys)."""
    try:
        value = json.loads(context)
    except ValueError:
        return False
    return value is None or (isinstance(value, list) and all(isinstance(v, str) and PLAIN.match(v) for v in value))


def check_calls(program: ExportedProgram, path: str) -> None:
    """Each call in the rebuilt graph is a torch operator (or ``operator.getitem``)."""
    import torch

    allowed = (torch._ops.OpOverload, torch._ops.HigherOrderOperator, torch._ops.OpOverloadPacket)
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if graph is not None else ():
            if node.op == "call_function" and not (isinstance(node.target, allowed) or node.target is operator.getitem):
                raise UnsafeModel(f"refused {path}: its program calls {node.target!r:.80}, not a torch operator")
            if node.op in ("call_method", "call_module"):
                raise UnsafeModel(f"refused {path}: its program holds a '{node.op}' node")
