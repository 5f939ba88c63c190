"""The user's own files, read with work bounded by their size and one clear line for every mistake:
CSV rows, ``.npy`` arrays (the header checked against the file's size before anything is allocated)
and images (decompression bombs refused).  Training (the ``csv`` and ``image-folder`` datasets) and
``optiflow predict`` read through these, so a file means the same to both.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from optiflow.errors import OptiflowError, first_line

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from PIL.Image import Image

#: the largest magnitude a float32 holds; a bigger input value would become inf in the model
FLOAT32_MAX = 3.4028234663852886e38
NPZ_MAGIC = b"PK\x03\x04"


def csv_rows(file: Path, delimiter: str = ",") -> list[list[str]]:
    """The non-empty rows of a UTF-8 CSV file (a byte-order mark is dropped); malformed CSV (an unclosed
    quote, a field over the csv module's limit) is one line naming the line, not the csv module's bare ``Error``."""
    with open(file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        try:
            return [row for row in reader if row]
        except csv.Error as exc:
            raise OptiflowError(f"csv file {file}, line {reader.line_num}: {first_line(exc)}") from None
        except UnicodeDecodeError:
            raise OptiflowError(f"csv file {file} is not UTF-8 text (line {reader.line_num + 1})") from None


def repeated(names: Iterable[str]) -> str | None:
    """The first name that comes a second time, in one pass (a header of 10^6 columns takes a moment)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def beyond_float32(values: NDArray[np.generic]) -> NDArray[np.bool_]:
    """A boolean mask of the finite ``values`` (a float numpy array) too large for float32."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)


def load_npy(file: Path) -> NDArray[np.generic]:
    """The array of a ``.npy`` file, its header checked against the file's size first: a header that
    declares more data than the file holds is refused before anything is allocated, and a ``.npz``
    archive, a pickled object array or a file that is no array at all is one line."""
    import numpy as np

    try:
        with open(file, "rb") as handle:
            if handle.read(4) == NPZ_MAGIC:
                raise OptiflowError(f"{file} is a .npz archive of several arrays, not a .npy array: "
                                    "save one array with numpy.save")
            handle.seek(0)
            try:
                version = np.lib.format.read_magic(handle)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(handle)
            except (ValueError, SyntaxError, TypeError, OverflowError, EOFError) as exc:
                raise OptiflowError(f"{file} is not a readable .npy array: {first_line(exc)}") from None
            if dtype.hasobject:
                raise OptiflowError(f"{file} holds Python objects, which optiflow never unpickles; save an array of numbers")
            declared = math.prod(shape) * dtype.itemsize
            held = file.stat().st_size - handle.tell()
            if declared > held:
                raise OptiflowError(f"{file} declares an array of shape {tuple(shape)} ({_size(declared)}), "
                                    f"but holds {_size(held)} of data: the file is truncated or not what it says")
            handle.seek(0)
            return np.lib.format.read_array(handle, allow_pickle=False)
    except ValueError as exc:
        raise OptiflowError(f"{file} is not a readable .npy array: {first_line(exc)}") from None
    except OSError as exc:
        raise OptiflowError(f"cannot read {file}: {first_line(exc)}") from None


def open_image(file: str | Path) -> Image:
    """The image at ``file`` as RGB; one line for a file that is no image, or one that would decompress
    to more pixels than Pillow's limit (``PIL.Image.MAX_IMAGE_PIXELS``: a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise OptiflowError(f"{file} is an image of more than {Image.MAX_IMAGE_PIXELS} pixels, Pillow's limit "
                            "against decompression bombs; resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise OptiflowError(f"{file} is not a readable image: {first_line(exc)}") from None


def _size(count: int) -> str:
    """``12 bytes``, ``3.2 MB``, ``32 TB``."""
    units = [(10**15, "PB"), (10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "kB")]
    return next((f"{count / scale:.3g} {unit}" for scale, unit in units if count >= scale), f"{count} bytes")
