"""CIFAR-10's python batch files read without unpickling them.

The batches are pickles, and unpickling runs whatever a file names, so a folder under
``--data-dir`` (or named by a stored run) could execute code. Instead the opcodes are walked
with ``pickletools.genops`` (a parser that executes nothing) and only what a batch holds is
built: dicts, lists, tuples, strings, numbers and uint8 arrays. Any other global is refused.
This reads the official files (Python 2 pickles) and small files in the same format alike.
"""

from __future__ import annotations

import pickletools
from pathlib import Path
from typing import Any

from optiflow.errors import OptiflowError

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                 "numpy._core.numeric")
ALLOWED_GLOBALS = {"_reconstruct", "ndarray", "dtype", "_frombuffer", "encode"}


class _Global:
    def __init__(self, module: str, name: str) -> None:
        self.name = name


class _Dtype:
    def __init__(self, code: str) -> None:
        self.code = code


class _Array:
    """An array announced by ``_reconstruct``: its shape and bytes arrive with BUILD."""


class NotABatch(Exception):
    """The file holds something other than a CIFAR batch."""


def read_split(folder: Path, train: bool):
    """(images uint8 shaped N x 32 x 32 x 3, labels) of the training batches or the test batch."""
    import numpy as np

    images, labels = [], []
    for name in TRAIN_BATCHES if train else [TEST_BATCH]:
        batch = read_batch(folder / name)
        data, batch_labels = batch.get("data"), batch.get("labels")
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise OptiflowError(f"{folder / name} is not a CIFAR-10 batch: 'data' is not N x 3072 bytes")
        if not isinstance(batch_labels, list) or len(batch_labels) != len(data) or not all(
                isinstance(v, int) and 0 <= v < 10 for v in batch_labels):
            raise OptiflowError(f"{folder / name} is not a CIFAR-10 batch: 'labels' are not {len(data)} classes 0-9")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch_labels)
    return np.concatenate(images), labels


def read_classes(folder: Path) -> list[str]:
    """The ten class names in ``batches.meta``."""
    names = read_batch(folder / META).get("label_names")
    if not isinstance(names, list) or len(names) != 10 or not all(isinstance(n, str) for n in names):
        raise OptiflowError(f"{folder / META} is not CIFAR-10's metadata: 'label_names' is not ten names")
    return names


def read_batch(path: Path) -> dict:
    """One batch file as a dict, built from its opcodes (nothing in the file is ever called)."""
    try:
        with open(path, "rb") as handle:
            value = _build(handle.read())
    except NotABatch as exc:
        raise OptiflowError(f"{path} is not a CIFAR-10 batch ({exc}); refusing to read it") from None
    except (ValueError, OSError) as exc:
        raise OptiflowError(f"{path} is not a readable CIFAR-10 batch ({exc})") from None
    if not isinstance(value, dict):
        raise OptiflowError(f"{path} is not a CIFAR-10 batch (it holds {type(value).__name__}, not a dict)")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in value.items()}


def _build(data: bytes) -> Any:
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            return stack.pop()
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple, "NONE": lambda: None,
                          "NEWTRUE": lambda: True, "NEWFALSE": lambda: False}[name]())
        elif opcode.arg is not None and name not in ("GLOBAL", "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET",
                                                     "LONG_BINGET"):
            if not isinstance(arg, (str, bytes, bytearray, int, float)):
                raise NotABatch(f"opcode {name}")
            stack.append(bytes(arg) if isinstance(arg, bytearray) else arg)
        elif name in ("TUPLE", "LIST", "DICT", "APPENDS", "SETITEMS"):
            start = marks.pop()
            items, stack[start:] = stack[start:], []
            if name == "TUPLE":
                stack.append(tuple(items))
            elif name == "LIST":
                stack.append(items)
            elif name == "DICT":
                stack.append(dict(zip(items[::2], items[1::2])))
            elif name == "APPENDS":
                _target(stack, list).extend(items)
            else:
                _target(stack, dict).update(zip(items[::2], items[1::2]))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            size = int(name[-1])
            items, stack[-size:] = stack[-size:], []
            stack.append(tuple(items))
        elif name == "APPEND":
            item = stack.pop()
            _target(stack, list).append(item)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            _target(stack, dict)[key] = value
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[int(arg)])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            module, attribute = arg.split(" ", 1) if name == "GLOBAL" else (stack.pop(-2), stack.pop())
            stack.append(_global(module, attribute))
        elif name == "REDUCE":
            args, function = stack.pop(), stack.pop()
            stack.append(_reduce(function, args))
        elif name == "BUILD":
            state = stack.pop()
            stack[-1] = _build_state(stack[-1], state)
        else:
            raise NotABatch(f"opcode {name}")
    raise NotABatch("no STOP opcode")


def _target(stack: list, kind: type):
    if not stack or not isinstance(stack[-1], kind):
        raise NotABatch(f"a {kind.__name__} was expected")
    return stack[-1]


def _global(module: Any, name: Any) -> _Global:
    allowed = (module == "_codecs" and name == "encode") or (module in NUMPY_MODULES and name in ALLOWED_GLOBALS)
    if not allowed:
        raise NotABatch(f"it names {module}.{name}")
    return _Global(module, name)


def _reduce(function: Any, args: Any) -> Any:
    """The few calls a batch makes, done here by hand; the named functions themselves are never called."""
    import numpy as np

    if not isinstance(function, _Global) or not isinstance(args, tuple):
        raise NotABatch("an unexpected call")
    if function.name == "encode" and len(args) == 2 and isinstance(args[0], str) and args[1] == "latin1":
        return args[0].encode("latin-1")
    if function.name == "dtype" and args and args[0] == "u1":
        return _Dtype("u1")
    if function.name == "_reconstruct":
        return _Array()
    if function.name == "_frombuffer" and len(args) == 4 and isinstance(args[1], _Dtype):
        buffer, _, shape, order = args
        return _uint8(np, buffer, shape, order == "F")
    raise NotABatch(f"a call to {function.name} it does not need")


def _build_state(target: Any, state: Any) -> Any:
    import numpy as np

    if isinstance(target, _Dtype):
        return target
    if isinstance(target, _Array) and isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _Dtype):
        _, shape, _, fortran, raw = state
        return _uint8(np, raw.encode("latin-1") if isinstance(raw, str) else raw, shape, fortran)
    raise NotABatch("an unexpected object state")


def _uint8(np, raw: Any, shape: Any, fortran: bool):
    if not isinstance(raw, bytes) or not isinstance(shape, tuple) or not all(isinstance(n, int) for n in shape):
        raise NotABatch("an array without bytes or shape")
    array = np.frombuffer(raw, dtype=np.uint8)
    if array.size != int(np.prod(shape)):
        raise NotABatch("an array whose bytes do not fill its shape")
    return array.reshape(shape, order="F" if fortran else "C").copy()
