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

from optiflow.errors import OptiflowError, first_line

if TYPE_CHECKING:
    from torch import Tensor
    from torch.export import ExportedProgram

MODEL_NAME = "model"
# A graph call: a torch operator overload (namespace.op[.overload]) or a Python operator/math function.
CALL_TARGET = re.compile(r"^(torch\.ops(\.[A-Za-z][A-Za-z0-9_]*){2,3}|_operator\.[a-z_]+|math\.[a-z_0-9]+)$")
# Names, dotted paths and plain values: no quotes, brackets, newlines or '#', so nothing can leave a string or
# a comment in the Python that torch.fx generates from the graph.
PLAIN = re.compile(r"^[A-Za-z0-9_.,;:+\-*/ ]*$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DOTTED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*)?$")
NAME_KEYS = {"name", "as_name", "user_input_name", "forward_arg_names"}
DOTTED_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"}
# The symbolic-shape expressions torch writes: Symbol('s77', positive=True, integer=True), s0 + 1, FloorDiv(s0, 2) ...
# No powers or shifts (9**9**9**9 would never finish), short numbers, short expressions.
EXPRESSION_TOKEN = re.compile(r"\s*(?:'[A-Za-z0-9_]+'|\d{1,12}(?![\d.])|[A-Za-z_][A-Za-z0-9_]*|//|[<>=!]=|[-+*/%(),<>=])")
EXPRESSION_NAMES = {
    "Symbol", "Integer", "oo", "True", "False", "Max", "Min", "FloorDiv", "CeilDiv", "CleanDiv", "Mod", "PythonMod",
    "ModularIndexing", "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "nonzero",
}
EXPRESSION_LENGTH = 400
SYMBOL_NAME = re.compile(r"^[a-z]+\d+$")
# Keys dropped before torch reads the program: stack traces become comments in generated code, and
# guards_code is Python source torch would exec (the Predictor checks input shapes itself).
DROPPED_KEYS: dict[str, object] = {"stack_trace": None, "guards_code": []}
# Operators that compute: aten/prims overloads that mutate nothing; a string argument only where it names
# a mode (a file name, a message to print or a path is refused).
OPERATOR_NAMESPACES = {"aten", "prims"}
MODE_ARGUMENTS = {"approximate", "rounding_mode", "reduce", "reduction", "padding_mode", "mode", "padding", "indexing"}
# The archive's layout as torch.export.save writes it for one program; anything else is refused.
LAYOUT = re.compile(r"^(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                    r"|models/model\.json|data/sample_inputs/model\.pt"
                    r"|data/weights/(model_weights_config\.json|weight_\d+)"
                    r"|data/constants/(model_constants_config\.json|tensor_\d+))$")
JSON_BYTES = 64 * 2**20
DEFLATE_RATIO = 100


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
        raise UnsafeModel(f"refused {name}: its exported program cannot be rebuilt ({type(exc).__name__}: "
                          f"{first_line(exc)[:160]})") from None
    check_calls(program, name)
    try:
        program.module()  # torch.fx generates the forward's Python here: a name it cannot write is refused now
    except Exception as exc:
        raise UnsafeModel(f"refused {name}: its exported program cannot be rebuilt ({type(exc).__name__}: "
                          f"{first_line(exc)[:160]})") from None
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
        self.names = {name.split("/", 1)[1] for name in names if "/" in name and not name.endswith("/")}
        for info in archive.infolist():
            inner = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
            if info.is_dir():
                continue
            if not LAYOUT.match(inner):
                raise UnsafeModel(f"refused {path}: its archive holds '{inner[:80]}', which is not part of an "
                                  "exported program")
            if info.file_size > DEFLATE_RATIO * max(info.compress_size, 2**20):
                raise UnsafeModel(f"refused {path}: '{inner}' inflates {info.file_size // max(info.compress_size, 1)}"
                                  " times (a zip bomb)")
            if inner.endswith(".json") and info.file_size > JSON_BYTES:
                raise UnsafeModel(f"refused {path}: '{inner}' is {info.file_size} bytes of JSON")

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
                try:
                    value = raw_tensor(self.read(folder + file), meta, deserialize_scalar_type)
                except UnsafeModel as exc:
                    raise UnsafeModel(f"refused {self.path}: {kind} entry '{file}': {exc}") from None
            values[fqn] = torch.nn.Parameter(value, requires_grad=False) if meta.get("is_param") else value
        return values


def raw_tensor(data: bytes, meta: dict, scalar_type: object) -> Tensor:
    """A tensor from its raw bytes and the sizes, strides and dtype its config gives: no larger than
    the record (no zero or overlapping strides that would multiply it), every index inside it."""
    import math

    import torch

    tensor_meta = meta.get("tensor_meta") or {}
    try:
        dtype = scalar_type(tensor_meta["dtype"])  # type: ignore[operator]
        sizes = [int(s["as_int"]) for s in tensor_meta["sizes"]]
        strides = [int(s["as_int"]) for s in tensor_meta["strides"]]
        offset = int((tensor_meta.get("storage_offset") or {}).get("as_int", 0))
        element = torch.empty(0, dtype=dtype).element_size()
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
        raise UnsafeModel(f"a tensor record has malformed metadata: {str(tensor_meta)[:200]}") from None
    if len(data) % element or len(sizes) != len(strides) or min([offset, *sizes, *strides], default=0) < 0:
        raise UnsafeModel(f"a tensor record of {len(data)} bytes does not fit its metadata: {str(tensor_meta)[:200]}")
    count = len(data) // element
    numel = math.prod(sizes)
    needed = offset + sum((size - 1) * stride for size, stride in zip(sizes, strides)) + 1 if numel else 0
    if needed > count or numel > count:
        raise UnsafeModel(f"a tensor record holds {count} values where its shape {sizes} needs {max(needed, numel)}")
    flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.zeros(0, dtype=dtype)
    return torch.as_strided(flat, sizes, strides, offset).clone()


def check_program(program: dict, path: str) -> None:
    """Every string in the program's JSON is a plain name, a torch operator or a shape expression;
    stack traces (comments only) and guard code are dropped."""
    def walk(value: object, key: str | None) -> None:
        if isinstance(value, dict):
            for name, empty in DROPPED_KEYS.items():
                if name in value:
                    value[name] = empty
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
    if key in ("target", "as_operator"):
        return bool(CALL_TARGET.match(value)) and "__" not in value
    if key == "expr_str":
        return shape_expression(value)
    if key in ("in_spec", "out_spec"):
        return tree_spec(value)
    if key in NAME_KEYS:
        return bool(IDENTIFIER.match(value))
    if key in DOTTED_KEYS:
        return bool(DOTTED.match(value))
    return bool(PLAIN.match(value))


def shape_expression(text: str) -> bool:
    """A sympy expression made of short numbers, symbols (``s0``), torch's division and min/max shape
    functions and arithmetic only: no attribute access, no other names, no powers, so ``sympify``
    can only build a small expression."""
    if len(text) > EXPRESSION_LENGTH or any(power in text for power in ("**", "<<", ">>", "^")):
        return False
    position = 0
    while position < len(text.rstrip()):
        match = EXPRESSION_TOKEN.match(text, position)
        if not match:
            return False
        token = match.group().strip()
        if (token[0].isalpha() or token[0] == "_") and not (token in EXPRESSION_NAMES or SYMBOL_NAME.match(token)):
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
    """Each call in the rebuilt graph computes: an aten/prims operator that mutates nothing and takes no
    file name or message (``from_file``, ``copy_``, ``_print`` and other namespaces' operators are
    refused), or ``operator.getitem``."""
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if graph is not None else ():
            if node.op == "call_function" and not (node.target is operator.getitem or computes(node.target)):
                raise UnsafeModel(f"refused {path}: its program calls {str(node.target)[:80]}, which is not an "
                                  "operator that only computes")
            if node.op in ("call_method", "call_module"):
                raise UnsafeModel(f"refused {path}: its program holds a '{node.op}' node")
            if node.op == "get_attr" and not (isinstance(node.target, str) and DOTTED.match(node.target)):
                raise UnsafeModel(f"refused {path}: its program reads the attribute {str(node.target)[:80]!r}")


def computes(target: object) -> bool:
    import torch

    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in OPERATOR_NAMESPACES:
        return False
    schema = target._schema
    return not schema.is_mutable and all(
        "str" not in str(argument.type).lower() or argument.name in MODE_ARGUMENTS for argument in schema.arguments)
