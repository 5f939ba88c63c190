"""Augmentations: torchvision transforms applied to each training sample (never to validation or test data)."""

from __future__ import annotations

from typing import Literal

from optiflow import hookimpl
from optiflow.errors import OptiflowError


@hookimpl
def optiflow_register_data(register):
    for name, factory in AUGMENTATIONS.items():
        register(name, factory, kind="augmentation")


class ImageTransform:
    """One torchvision transform applied to a single CHW image tensor; rejects non-image inputs clearly."""

    #: the core refuses a run on non-image data before it opens (samples of another rank)
    sample_ndim = 3

    def __init__(self, name: str, transform) -> None:
        self.name, self.transform = name, transform

    def __call__(self, sample):
        if sample.ndim != 3:
            raise OptiflowError(
                f"augmentation '{self.name}' needs image inputs (C, H, W), got a sample of shape {list(sample.shape)}"
            )
        return self.transform(sample)


def hflip(*, p: float = 0.5):
    """Flip the image left-right with probability p."""
    from torchvision.transforms import v2

    return ImageTransform("hflip", v2.RandomHorizontalFlip(_probability(p)))


def vflip(*, p: float = 0.5):
    """Flip the image upside down with probability p."""
    from torchvision.transforms import v2

    return ImageTransform("vflip", v2.RandomVerticalFlip(_probability(p)))


def rotation(*, degrees: float = 15.0):
    """Rotate by an angle drawn uniformly from [-degrees, degrees] (corners filled with 0)."""
    from torchvision.transforms import v2

    if degrees < 0:
        raise OptiflowError(f"rotation: degrees must be >= 0, got {degrees}")
    return ImageTransform("rotation", v2.RandomRotation(degrees))


class RandomCrop:
    """Pad by ``padding`` on every side, then crop back to the image's own size at a random offset."""

    def __init__(self, padding: int, mode: str) -> None:
        self.padding, self.mode = padding, mode
        self.crops: dict = {}

    def __call__(self, sample):
        from torchvision.transforms import v2

        size = tuple(sample.shape[-2:])
        if self.padding > max(size):
            raise OptiflowError(f"random-crop: padding must be at most the image's size ({size[0]}x{size[1]}), "
                                f"got {self.padding}")
        if size not in self.crops:
            self.crops[size] = v2.RandomCrop(size, padding=self.padding, padding_mode=self.mode)
        return self.crops[size](sample)


def random_crop(*, padding: int = 4, mode: Literal["constant", "edge", "reflect", "symmetric"] = "constant"):
    """Pad each side by padding pixels and crop back to the original size at a random position."""
    if padding < 0:
        raise OptiflowError(f"random-crop: padding must be >= 0, got {padding}")
    return ImageTransform("random-crop", RandomCrop(padding, mode))


class OnUnitRange:
    """Apply ``transform`` (which expects values in [0, 1]) to a sample mapped there by its own min and max."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, sample):
        low, high = sample.min(), sample.max()
        span = (high - low).clamp_min(1e-12)
        return self.transform((sample - low) / span) * span + low


def color_jitter(*, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.0):
    """Random brightness, contrast, saturation and hue changes (saturation and hue need colour images)."""
    from torchvision.transforms import v2

    try:
        jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
    except ValueError as exc:
        raise OptiflowError(f"color-jitter: {exc}") from None
    return ImageTransform("color-jitter", OnUnitRange(jitter))


def random_erasing(*, p: float = 0.5, scale: tuple[float, ...] = (0.02, 0.33), ratio: tuple[float, ...] = (0.3, 3.3),
                   value: float = 0.0):
    """Erase a random rectangle (area fraction in scale, aspect ratio in ratio) with probability p (Zhong et al. 2017)."""
    from torchvision.transforms import v2

    if len(scale) != 2 or len(ratio) != 2:
        raise OptiflowError("random-erasing: scale and ratio take two numbers each, e.g. scale=[0.02,0.33]")
    if not 0 <= scale[0] <= scale[1] <= 1:
        raise OptiflowError(f"random-erasing: scale is the erased fraction [MIN,MAX] of the image, "
                            f"0 <= MIN <= MAX <= 1, got {list(scale)}")
    if not 0 < ratio[0] <= ratio[1]:
        raise OptiflowError(f"random-erasing: ratio is the erased rectangle's aspect ratio [MIN,MAX], "
                            f"0 < MIN <= MAX, got {list(ratio)}")
    try:
        eraser = v2.RandomErasing(p=_probability(p), scale=tuple(scale), ratio=tuple(ratio), value=value)
    except ValueError as exc:
        raise OptiflowError(f"random-erasing: {exc}") from None
    return ImageTransform("random-erasing", eraser)


def _probability(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise OptiflowError(f"probability p must be in [0, 1], got {p}")
    return p


AUGMENTATIONS = {
    "hflip": hflip,
    "vflip": vflip,
    "rotation": rotation,
    "random-crop": random_crop,
    "color-jitter": color_jitter,
    "random-erasing": random_erasing,
}
