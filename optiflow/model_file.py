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
import keyword
import operator
import re
import zipfile
from typing import TYPE_CHECKING, Any

from optiflow.errors import OptiflowError, first_line

if TYPE_CHECKING:
    from torch import Tensor
    from torch.export import ExportedProgram

MODEL_NAME = "model"
# A graph call: a torch operator overload (namespace.op[.overload]) or a Python operator/math function.
CALL_TARGET = re.compile(r"^(torch\.ops(\.[A-Za-z][A-Za-z0-9_]*){2,3}|torch\.ops\.aten\._assert_tensor_metadata\.default"
                         r"|_operator\.[a-z_]+|math\.[a-z_0-9]+)$")
# Names, dotted paths and plain values: no quotes, brackets, newlines or '#', so nothing can leave a string or
# a comment in the Python that torch.fx generates from the graph.
PLAIN = re.compile(r"^[A-Za-z0-9_.,;:+\-*/ ]*$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DOTTED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*)?$")
NAME_KEYS = {"name", "as_name", "user_input_name", "forward_arg_names"}
DOTTED_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"}
# The symbolic-shape expressions torch writes for a free batch size (see shape_expression).
SHAPE_EXPRESSION = re.compile(r"^(Symbol\('[a-z]+\d+'(, (positive|integer|nonnegative|real|finite)=(True|False))*\)"
                              r"|-?\d{1,12}|(\d{1,6}\*)?[a-z]+\d+( [+-] \d{1,6})?)$")
# Keys dropped before torch reads the program: stack traces become comments in generated code, and
# guards_code is Python source torch would exec (the Predictor checks input shapes itself).
DROPPED_KEYS: dict[str, object] = {"stack_trace": None, "guards_code": []}
# Operators that compute, by name: the forward operators torch.export writes for layered networks (dense,
# convolutional, pooling, normalization, activations, shape and arithmetic), each of whose kernels checks its
# inputs and sizes its output by them. Anything else (factories that allocate a size written in the graph,
# backward kernels that write where an index says, segment reductions, I/O) is refused.
OPERATOR_NAMESPACES = {"aten"}
ALLOWED_OPERATORS = frozenset("""
    linear addmm mm bmm matmul t transpose permute view reshape flatten unflatten squeeze unsqueeze contiguous
    clone alias detach lift_fresh_copy slice select narrow cat stack split split_with_sizes chunk unbind flip
    conv1d conv2d conv3d convolution conv_transpose1d conv_transpose2d
    max_pool1d max_pool2d max_pool3d max_pool2d_with_indices avg_pool1d avg_pool2d avg_pool3d
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d
    batch_norm native_batch_norm layer_norm native_layer_norm group_norm native_group_norm instance_norm dropout
    feature_dropout alpha_dropout
    softmax log_softmax relu relu6 leaky_relu elu selu celu gelu silu mish softplus softsign sigmoid tanh hardtanh
    hardsigmoid hardswish prelu threshold logsigmoid glu softshrink hardshrink tanhshrink
    add sub mul div neg abs exp log log1p expm1 sqrt rsqrt reciprocal square pow clamp clamp_min clamp_max clip
    minimum maximum where sign erf sin cos floor ceil round trunc remainder fmod
    eq ne gt ge lt le logical_and logical_or logical_not
    sum mean amax amin max min var std var_mean std_mean prod argmax argmin norm linalg_vector_norm
    zeros_like ones_like full_like scalar_tensor to type_as sym_size sym_numel sym_stride _assert_tensor_metadata
    numpy_T mT
""".split())
MODE_ARGUMENTS = {"approximate", "rounding_mode", "padding"}
# Python names a node may not take: torch.fx's generated forward uses them.
RESERVED_NAMES = frozenset(dir(__builtins__) if isinstance(__builtins__, dict) else dir(__builtins__)) | {
    "torch", "self", "pytree", "fx_pytree", "device", "inf", "nan", "NoneType", "math", "operator"}
SAMPLE_TENSORS = 64
SAMPLE_VALUES = 2**28  # the most values one intermediate tensor may hold for a single sample (1 GiB of float32)
SPEC_LENGTH = 10_000
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
        sample_inputs = check_sample_inputs(entries.tensors(f"data/sample_inputs/{MODEL_NAME}.pt"), name)
    try:
        program = ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, sample_inputs)
    except Exception as exc:  # a malformed program: torch's own checks, worded as torch words them
        raise UnsafeModel(f"refused {name}: its exported program cannot be rebuilt ({type(exc).__name__}: "
                          f"{first_line(exc)[:160]})") from None
    check_calls(program, name)
    try:
        module = program.module()  # torch.fx generates the forward's Python here: a name it cannot write is refused now
        largest = largest_value(module, program)
    except Exception as exc:
        raise UnsafeModel(f"refused {name}: its exported program cannot be rebuilt ({type(exc).__name__}: "
                          f"{first_line(exc)[:160]})") from None
    if largest > SAMPLE_VALUES:
        raise UnsafeModel(f"refused {name}: one sample would make a tensor of {largest:,} values "
                          f"(at most {SAMPLE_VALUES:,})")
    return program


def largest_value(module: object, program: ExportedProgram) -> int:
    """The largest tensor (in values) the graph makes for one sample, found on fake tensors (no memory
    is allocated): sizes the graph writes (a padding, a view) cannot make it allocate without bound."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    user_inputs = set(program.graph_signature.user_inputs)
    inputs = []
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in user_inputs:
                value = node.meta["val"]
                shape = [1 if not isinstance(size, int) else size for size in value.shape]
                inputs.append(torch.empty(shape, dtype=value.dtype))
    propagated = FakeTensorProp(module, mode)  # type: ignore[arg-type]
    propagated.propagate(*inputs)
    largest = 0
    for node in module.graph.nodes:  # type: ignore[attr-defined]
        for value in torch.utils._pytree.tree_leaves(node.meta.get("val")):
            if isinstance(value, torch.Tensor):
                largest = max(largest, int(value.numel()))
    return largest


def check_sample_inputs(sample: object, name: str) -> tuple[tuple[Tensor, ...], dict[str, Any]]:
    """``((tensor, ...), {})``: a few tensors, nothing nested (torch walks nested containers one leaf at a time)."""
    import torch

    if not (isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[0], tuple) and sample[1] == {}
            and len(sample[0]) <= SAMPLE_TENSORS and all(isinstance(t, torch.Tensor) for t in sample[0])):
        raise UnsafeModel(f"refused {name}: its sample inputs are not a short tuple of tensors")
    return tuple(sample[0]), {}


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

    def json(self, name: str) -> dict[str, Any]:
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
        files: set[str] = set()
        for fqn, meta in config.items():
            file = meta.get("path_name") if isinstance(meta, dict) else None
            if not isinstance(file, str) or not PLAIN.match(fqn) or not PLAIN.match(file):
                raise UnsafeModel(f"{self.path}: '{config_name}' has a malformed entry for '{fqn}'")
            if file in files:
                raise UnsafeModel(f"refused {self.path}: {kind} entry '{file}' is named by more than one tensor")
            files.add(file)
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


def raw_tensor(data: bytes, meta: dict[str, Any], scalar_type: object) -> Tensor:
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


def check_program(program: dict[str, Any], path: str) -> None:
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
                walk(item, "argument_name" if name == "name" and "arg" in value else name)
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
    if key == "argument_name":  # an operator's parameter name (NamedArgument), never a name in generated code
        return bool(IDENTIFIER.match(value))
    if key in NAME_KEYS:
        return bool(IDENTIFIER.match(value)) and value not in RESERVED_NAMES and not keyword.iskeyword(value)
    if key in DOTTED_KEYS:
        return bool(DOTTED.match(value))
    return bool(PLAIN.match(value))


def shape_expression(text: str) -> bool:
    """A shape expression of the forms torch writes for a free batch size: a symbol's declaration
    (``Symbol('s77', positive=True, integer=True)``), a symbol, an integer, or ``a*s + b``. Nothing else
    reaches ``sympify``, which evaluates its string and can take for ever on a small one."""
    return bool(SHAPE_EXPRESSION.match(text.strip()))


def tree_spec(text: str) -> bool:
    """A pytree spec: JSON whose node types are ones torch's pytree registry knows."""
    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    if len(text) > SPEC_LENGTH:
        return False
    try:
        version, spec = json.loads(text)
    except (ValueError, TypeError, RecursionError):
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

    try:
        return isinstance(version, int) and known(spec)
    except RecursionError:
        return False


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
    if target._overloadpacket.__name__ not in ALLOWED_OPERATORS:
        return False
    schema = target._schema
    return not schema.is_mutable and all(
        "str" not in str(argument.type).lower() or argument.name in MODE_ARGUMENTS for argument in schema.arguments)
