"""What a trace of a module may read besides its weights, as one digest (:func:`fingerprint`): two modules with
the same fingerprint and the same ``state_dict`` export to the same program.

It describes what it knows how to describe completely: a module's class by what it holds up to ``nn.Module``
(methods, class attributes), tensors by their bytes, numbers and strings by ``repr``, containers by their items,
functions by their code, defaults, closure cells and the globals they name, bound methods by their function and
object, other classes, modules and torch's dtypes by their names, plain objects by their attributes.  Anything else
(an object of C code, too deep or too many items) has no fingerprint (None): the run then exports its model
itself (:mod:`optiflow.export_ahead`), never a program traced from state that may have changed since."""

from __future__ import annotations

import enum
import functools
import hashlib
import types

import torch
from torch import Tensor, nn

from optiflow.digest import tensors_digest

MAX_DEPTH = 12  #: objects nested deeper than this have no fingerprint
MAX_ITEMS = 20_000  #: nor does a module whose description has more values than this
_HEAP_TYPE = 1 << 9  #: Py_TPFLAGS_HEAPTYPE: a class written in Python (not C code)
_CLASS_PLUMBING = {"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__annotations__",
                   "__slotnames__", "__parameters__", "__orig_bases__", "__abstractmethods__", "_abc_impl"}
_NAMED = (torch.dtype, torch.device, torch.layout, torch.memory_format, enum.Enum, range, slice, type(Ellipsis))


class Unknown(Exception):
    """Something a trace may read that the fingerprint cannot describe."""


def fingerprint(module: nn.Module) -> str | None:
    """SHA-256 of what a trace of ``module`` may read besides its weights (its ``state_dict``): each submodule's
    type, its class's methods and attributes, its own attributes (parameters and persistent buffers by name, shape,
    dtype, strides and which storage they share, not by value), its hooks, and torch's global module hooks; None
    when part of it cannot be described (see the module's docstring)."""
    from torch.nn.modules import module as modules

    tree = {id(sub): name for name, sub in module.named_modules(remove_duplicate=False)}
    describe = _Describer(tree)
    storages: dict[int, str] = {}
    digest = hashlib.sha256()
    try:
        for hooks in (modules._global_forward_hooks, modules._global_forward_pre_hooks,
                      modules._global_backward_hooks, modules._global_backward_pre_hooks):
            digest.update(describe(list(hooks.values())).encode())
        for name, sub in module.named_modules(remove_duplicate=False):
            kind = type(sub)
            digest.update(repr((name, describe(kind), describe.module_class(kind))).encode())
            transient: set[str] = getattr(sub, "_non_persistent_buffers_set", set())
            for key, value in sorted(vars(sub).items()):
                if key in ("_parameters", "_buffers"):
                    value = {n: describe(t) if n in transient else _shape(t, f"{name}.{n}", storages)
                             for n, t in value.items()}
                elif key == "_modules":
                    value = list(value)
                digest.update(f"{key}={describe(value)}".encode())
    except Exception:  # noqa: BLE001 - Unknown, or a value that failed to be described: no fingerprint
        return None
    return digest.hexdigest()


def describe(value: object) -> str | None:
    """A stable text of ``value`` (as the fingerprint describes it), None when it cannot be described."""
    try:
        return _Describer({})(value)
    except Exception:  # noqa: BLE001 - as fingerprint's
        return None


def _shape(tensor: Tensor | None, name: str, storages: dict[int, str]) -> str:
    """A weight's metadata: what a trace specializes on, and the first weight sharing its storage (tied weights)."""
    if tensor is None:
        return "None"
    shared = storages.setdefault(tensor.untyped_storage().data_ptr(), name) if tensor.numel() else name
    return f"{tuple(tensor.shape)}:{tensor.dtype}:{tensor.requires_grad}:{tensor.stride()}:" \
           f"{tensor.storage_offset()}:{type(tensor).__qualname__}:{shared}"


class _Describer:
    """A stable text of a value (see the module's docstring); raises :class:`Unknown`."""

    def __init__(self, tree: dict[int, str]) -> None:
        self.tree, self.items, self.open = tree, 0, set[int]()

    def __call__(self, value: object, depth: int = 0) -> str:
        self.items += 1
        if depth > MAX_DEPTH or self.items > MAX_ITEMS:
            raise Unknown
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return repr(value)
        if isinstance(value, Tensor):
            return _tensor(value)
        if isinstance(value, type):
            return f"class {value.__module__}.{value.__qualname__}"
        if isinstance(value, types.ModuleType):
            return f"module {value.__name__}"
        if isinstance(value, _NAMED):
            return f"{type(value).__qualname__}:{value!r}"
        if isinstance(value, nn.Module) and id(value) in self.tree:
            return f"submodule {self.tree[id(value)]!r}"  # described as one of the module's own
        if id(value) in self.open:
            return "cycle"  # what it holds is being described: a function calling itself, an object's back link
        self.open.add(id(value))
        try:
            return f"{type(value).__module__}.{type(value).__qualname__}:{self._inside(value, depth + 1)}"
        finally:
            self.open.discard(id(value))

    def module_class(self, kind: type) -> str:
        """What a module's class holds up to ``nn.Module``: its methods (``forward`` and what it calls), class
        attributes and properties (a plugin may set ``Model.scale`` or replace ``Model.helper``)."""
        held = {}
        for owner in kind.__mro__:
            if owner in (nn.Module, object):
                break
            for name, value in vars(owner).items():
                if name in _CLASS_PLUMBING or name in held:
                    continue
                if isinstance(value, property):
                    value = (value.fget, value.fset, value.fdel)
                elif isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                held[name] = self(value, 1)
        return repr(sorted(held.items()))

    def _inside(self, value: object, depth: int) -> str:
        tobytes = getattr(value, "tobytes", None)
        if callable(tobytes) and hasattr(value, "dtype") and hasattr(value, "shape"):  # a NumPy array or scalar
            return f"{value.shape}:{value.dtype}:{hashlib.sha256(tobytes()).hexdigest()}"
        if isinstance(value, (list, tuple, set, frozenset)):
            items = [self(v, depth) for v in value]
            return "[" + ", ".join(sorted(items) if isinstance(value, (set, frozenset)) else items) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{self(k, depth)}: {self(v, depth)}" for k, v in value.items()) + "}"
        if isinstance(value, types.FunctionType):
            return self._function(value, depth)
        if isinstance(value, types.CodeType):
            return self._code(value, depth)
        if isinstance(value, types.MethodType):
            return f"{self(value.__func__, depth)} of {self(value.__self__, depth)}"
        if isinstance(value, types.BuiltinFunctionType):  # torch.tanh, math.exp, a list's append
            owner = value.__self__
            of = "" if owner is None or isinstance(owner, (type, types.ModuleType)) else self(owner, depth)
            return f"{value.__module__}.{value.__qualname__}({of})"
        if isinstance(value, functools.partial):
            return f"{self(value.func, depth)}{self(value.args, depth)}{self(value.keywords, depth)}"
        if _plain(type(value)):
            return self(sorted(vars(value).items()), depth)
        raise Unknown

    def _function(self, function: types.FunctionType, depth: int) -> str:
        """Its code, defaults, closure cells and the globals its code names (a function among them in turn)."""
        cells = [cell.cell_contents for cell in function.__closure__ or ()]
        names = _global_names(function.__code__)
        named = {name: function.__globals__[name] for name in sorted(names) if name in function.__globals__}
        globals_ = {name: self(value, depth) for name, value in named.items()}  # a helper function's, in turn
        return f"{function.__qualname__}:{self._code(function.__code__, depth)}:{self(function.__defaults__, depth)}" \
               f":{self(function.__kwdefaults__, depth)}:{self(cells, depth)}:{self(globals_, depth)}"

    def _code(self, code: types.CodeType, depth: int) -> str:
        consts = [self._code(c, depth + 1) if isinstance(c, types.CodeType) else self(c, depth + 1)
                  for c in code.co_consts]
        return f"{hashlib.sha256(code.co_code).hexdigest()}:{code.co_names}:{consts}"


def _plain(kind: type) -> bool:
    """Whether objects of ``kind`` hold all their state in their ``__dict__``: classes written in Python, no slots."""
    return all(k is object or (k.__flags__ & _HEAP_TYPE and "__slots__" not in vars(k)) for k in kind.__mro__) \
        and "__dict__" in {name for k in kind.__mro__ for name in vars(k)}


def _global_names(code: types.CodeType) -> set[str]:
    """The names ``code`` and the code nested in it (comprehensions, lambdas) may read as globals."""
    return set(code.co_names).union(*(_global_names(c) for c in code.co_consts if isinstance(c, types.CodeType)))


def _tensor(value: Tensor) -> str:
    try:
        content = tensors_digest([("", value)])
    except (RuntimeError, TypeError):  # a dtype NumPy cannot hold (quantized): its values
        content = repr(value.detach().cpu().reshape(-1).tolist())
    return f"tensor{tuple(value.shape)}:{value.dtype}:{content}"
