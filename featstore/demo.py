"""The demo dataset: small synthetic clips with exact masks, generated offline and deterministically.

Each clip is one textured blob moving along a smooth path (and slowly turning and changing scale) over
a textured, slowly panning background of its own kind. Masks come from the same geometry as the pixels,
so they are exact. Object and background palettes differ but overlap a little, which keeps the task
learnable by a light decoder without being solvable by a colour threshold.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from featstore.errors import DatasetError

__all__ = ["DEMO_CLIPS", "DEMO_FRAMES", "DEMO_SIZE", "generate_demo"]

DEMO_FRAMES = 12
DEMO_SIZE = (240, 432)  # (height, width)
_SEED = 2016
_PAN = 24  # pixels of horizontal camera pan over a clip
_JPEG_QUALITY = 90

Rgb = tuple[float, float, float]
Background = Callable[[np.random.Generator, int, int, "_ClipStyle"], np.ndarray]


@dataclass(frozen=True)
class _ClipStyle:
    """How one clip looks: background kind and palette, object palette, texture and path."""

    background: str
    background_colours: tuple[Rgb, Rgb]
    object_colours: tuple[Rgb, Rgb]
    texture_frequency: tuple[float, float]  # cycles across the object's radius, along u and v
    radii: tuple[float, float]  # ellipse half-axes in pixels
    path_amplitude: tuple[float, float]  # horizontal and vertical excursion in pixels
    path_phase: float
    spin: float  # radians turned over the clip


_STYLES: dict[str, _ClipStyle] = {
    "stripes": _ClipStyle(
        background="stripes",
        background_colours=((0.20, 0.35, 0.55), (0.75, 0.70, 0.45)),
        object_colours=((0.80, 0.50, 0.25), (0.68, 0.64, 0.42)),
        texture_frequency=(1.5, 0.0),
        radii=(62, 40),
        path_amplitude=(120, 45),
        path_phase=0.0,
        spin=0.6,
    ),
    "clouds": _ClipStyle(
        background="clouds",
        background_colours=((0.30, 0.55, 0.30), (0.60, 0.75, 0.55)),
        object_colours=((0.62, 0.70, 0.35), (0.40, 0.45, 0.70)),
        texture_frequency=(1.0, 1.0),
        radii=(55, 48),
        path_amplitude=(110, 50),
        path_phase=1.1,
        spin=-0.4,
    ),
    "gradient": _ClipStyle(
        background="gradient",
        background_colours=((0.15, 0.15, 0.25), (0.80, 0.55, 0.40)),
        object_colours=((0.35, 0.70, 0.65), (0.65, 0.40, 0.55)),
        texture_frequency=(0.0, 2.0),
        radii=(70, 36),
        path_amplitude=(125, 40),
        path_phase=2.3,
        spin=0.9,
    ),
    "checker": _ClipStyle(
        background="checker",
        background_colours=((0.45, 0.45, 0.50), (0.70, 0.65, 0.55)),
        object_colours=((0.75, 0.30, 0.30), (0.45, 0.50, 0.40)),
        texture_frequency=(2.0, 2.0),
        radii=(58, 44),
        path_amplitude=(115, 55),
        path_phase=3.4,
        spin=-0.7,
    ),
    "rings": _ClipStyle(
        background="rings",
        background_colours=((0.55, 0.40, 0.30), (0.35, 0.30, 0.45)),
        object_colours=((0.30, 0.55, 0.75), (0.70, 0.60, 0.35)),
        texture_frequency=(1.2, 0.6),
        radii=(64, 42),
        path_amplitude=(120, 48),
        path_phase=4.2,
        spin=0.5,
    ),
    "speckle": _ClipStyle(
        background="speckle",
        background_colours=((0.50, 0.50, 0.45), (0.30, 0.35, 0.30)),
        object_colours=((0.60, 0.35, 0.60), (0.85, 0.75, 0.55)),
        texture_frequency=(0.8, 1.6),
        radii=(60, 46),
        path_amplitude=(118, 52),
        path_phase=5.0,
        spin=-1.0,
    ),
}
DEMO_CLIPS: tuple[str, ...] = tuple(sorted(_STYLES))


def generate_demo(root: Path) -> Path:
    """Write the demo dataset in DAVIS layout under ``root`` (built aside, then renamed into place).

    Returns ``root`` at once when a complete demo dataset is already there; refuses to touch a
    non-empty folder that is not one.
    """
    root = Path(root)
    if root.exists():
        if _is_complete(root):
            return root
        if not root.is_dir() or any(root.iterdir()):
            raise DatasetError(
                f"{root}: exists but is not a complete demo dataset; remove it so the demo can be generated there"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = root.parent / f".{root.name}.{os.getpid()}.{uuid.uuid4().hex}.partial"
    scratch.mkdir()
    try:
        for index, clip in enumerate(DEMO_CLIPS):
            _write_clip(scratch, clip, index)
        try:
            os.rename(scratch, root)  # atomic; replaces an empty folder
        except OSError:
            if not _is_complete(root):  # another process won the race with the same content
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return root


def _expected_files(root: Path) -> list[Path]:
    files = []
    for clip in DEMO_CLIPS:
        for frame in range(DEMO_FRAMES):
            files.append(root / "JPEGImages" / "480p" / clip / f"{frame:05d}.jpg")
            files.append(root / "Annotations" / "480p" / clip / f"{frame:05d}.png")
    return files


def _is_complete(root: Path) -> bool:
    return root.is_dir() and all(path.is_file() for path in _expected_files(root))


def _write_clip(root: Path, clip: str, index: int) -> None:
    style = _STYLES[clip]
    rng = np.random.default_rng([_SEED, index])
    height, width = DEMO_SIZE
    background = _BACKGROUNDS[style.background](rng, height, width + _PAN, style)
    raw_dir = root / "JPEGImages" / "480p" / clip
    mask_dir = root / "Annotations" / "480p" / clip
    raw_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    for frame in range(DEMO_FRAMES):
        image, mask = _render(rng, background, style, frame)
        Image.fromarray(image).save(raw_dir / f"{frame:05d}.jpg", quality=_JPEG_QUALITY)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{frame:05d}.png")


def _render(
    rng: np.random.Generator, background: np.ndarray, style: _ClipStyle, frame: int
) -> tuple[np.ndarray, np.ndarray]:
    """One frame (uint8 RGB) and its exact mask (bool), from the object's pose at this time."""
    height, width = DEMO_SIZE
    t = frame / DEMO_FRAMES
    offset = round(_PAN * t)
    canvas = background[:, offset : offset + width].astype(np.float32)

    centre_x = width / 2 + style.path_amplitude[0] * np.sin(2 * np.pi * t + style.path_phase)
    centre_y = height / 2 + style.path_amplitude[1] * np.sin(4 * np.pi * t + 0.5 * style.path_phase)
    scale = 1.0 + 0.15 * np.sin(2 * np.pi * t + style.path_phase / 2)
    angle = style.path_phase + style.spin * t

    # Only the object's bounding box is evaluated: the outline never leaves 1.17 x the larger radius.
    reach = 1.2 * max(style.radii) * scale + 2
    top, bottom = max(0, int(centre_y - reach)), min(height, int(centre_y + reach) + 1)
    left, right = max(0, int(centre_x - reach)), min(width, int(centre_x + reach) + 1)
    ys, xs = np.mgrid[top:bottom, left:right]
    dx, dy = xs - centre_x, ys - centre_y
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * dx + sin * dy) / (style.radii[0] * scale)
    v = (-sin * dx + cos * dy) / (style.radii[1] * scale)
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    boundary = 1.0 + 0.12 * np.cos(3 * theta + style.path_phase) + 0.05 * np.cos(5 * theta - 2 * t)
    inside = rho < boundary

    # Texture in object coordinates, so it moves, turns and scales with the object.
    weave = 0.5 + 0.5 * np.sin(
        2 * np.pi * (style.texture_frequency[0] * u + style.texture_frequency[1] * v) + 1.3
    )
    dots = 0.5 + 0.5 * np.cos(5.0 * u) * np.cos(5.0 * v)
    mix = np.clip(0.7 * weave + 0.3 * dots, 0.0, 1.0)[..., None]
    low, high = np.array(style.object_colours[0]), np.array(style.object_colours[1])
    shading = (0.8 + 0.2 * np.clip(1.0 - rho**2, 0.0, 1.0))[..., None]
    texture = (low * (1 - mix) + high * mix) * shading
    canvas[top:bottom, left:right][inside] = texture[inside]
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = inside

    canvas += 0.025 * rng.standard_normal(canvas.shape, dtype=np.float32)  # sensor noise, fresh every frame
    image = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    return image, mask


def _smooth_noise(
    rng: np.random.Generator, height: int, width: int, cells: tuple[int, int], channels: int
) -> np.ndarray:
    """Bilinearly upsampled random grid in [0, 1]: low-frequency noise without a filtering library."""
    grid = rng.random((cells[0] + 1, cells[1] + 1, channels))
    ys = np.linspace(0.0, cells[0], height)
    xs = np.linspace(0.0, cells[1], width)
    y0 = np.minimum(ys.astype(int), cells[0] - 1)
    x0 = np.minimum(xs.astype(int), cells[1] - 1)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep hides the grid lines
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return np.asarray(top * (1 - fy) + bottom * fy)


def _blend(colours: tuple[Rgb, Rgb], weight: np.ndarray) -> np.ndarray:
    first, second = np.array(colours[0]), np.array(colours[1])
    w = weight[..., None] if weight.ndim == 2 else weight
    return np.asarray(first * (1 - w) + second * w)


def _stripes(rng: np.random.Generator, height: int, width: int, style: _ClipStyle) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    wobble = _smooth_noise(rng, height, width, (3, 6), 1)[..., 0]
    phase = 2 * np.pi * (xs * 0.8 + ys * 0.6) / 28.0 + 3.0 * wobble
    return _blend(style.background_colours, 0.5 + 0.5 * np.sin(phase)) + 0.06 * (wobble[..., None] - 0.5)


def _clouds(rng: np.random.Generator, height: int, width: int, style: _ClipStyle) -> np.ndarray:
    octaves = (
        sum(_smooth_noise(rng, height, width, (2 * 2**k, 4 * 2**k), 1)[..., 0] / 2**k for k in range(4))
        / 1.875
    )
    tint = _smooth_noise(rng, height, width, (2, 3), 3) - 0.5
    return _blend(style.background_colours, octaves) + 0.15 * tint


def _gradient(rng: np.random.Generator, height: int, width: int, style: _ClipStyle) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = 0.6 * xs / width + 0.4 * ys / height
    grain = rng.normal(0.0, 0.05, (height, width, 3))
    return _blend(style.background_colours, ramp) + grain


def _checker(rng: np.random.Generator, height: int, width: int, style: _ClipStyle) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    soft = 0.5 + 0.5 * np.tanh(3.0 * np.sin(2 * np.pi * xs / 36.0) * np.sin(2 * np.pi * ys / 36.0))
    mottling = _smooth_noise(rng, height, width, (6, 12), 3) - 0.5
    return _blend(style.background_colours, soft) + 0.12 * mottling


def _rings(rng: np.random.Generator, height: int, width: int, style: _ClipStyle) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    radius = np.hypot(xs + 0.3 * width, ys - 1.2 * height)
    jitter = _smooth_noise(rng, height, width, (4, 8), 1)[..., 0]
    weight = 0.5 + 0.5 * np.sin(2 * np.pi * radius / 22.0 + 2.0 * jitter)
    return _blend(style.background_colours, weight) + 0.05 * rng.normal(0.0, 1.0, (height, width, 3))


def _speckle(rng: np.random.Generator, height: int, width: int, style: _ClipStyle) -> np.ndarray:
    coarse = _smooth_noise(rng, height, width, (8, 14), 1)[..., 0]
    speckle = rng.random((height, width, 3))
    return _blend(style.background_colours, coarse) + 0.25 * (speckle - 0.5)


_BACKGROUNDS: dict[str, Background] = {
    "stripes": _stripes,
    "clouds": _clouds,
    "gradient": _gradient,
    "checker": _checker,
    "rings": _rings,
    "speckle": _speckle,
}
