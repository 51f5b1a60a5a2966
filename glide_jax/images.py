"""Image helpers: [-1, 1] float <-> uint8, captioned PNG grids."""
from __future__ import annotations

import os
import pathlib
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] float in [-1, 1] -> uint8 (GLIDE's rounding: (x+1)*127.5, clip, round)."""
    x = np.asarray(x, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(x: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return np.asarray(x, np.float32) / 127.5 - 1.0


def grid(images: np.ndarray, captions: Sequence[str] | None = None, *, cols: int | None = None,
         scale: int = 1, row_labels: Sequence[str] | None = None) -> np.ndarray:
    """Tiles uint8 images [N, H, W, 3] into one image, each with its caption underneath.

    Args:
      images: uint8 [N, H, W, 3].
      captions: optional N strings, wrapped under each tile.
      cols: tiles per row (default: N, one row).
      scale: nearest-neighbour upscaling of each tile (small images are hard to see).
      row_labels: optional label drawn at the left of each row.
    Returns:
      uint8 [H', W', 3].
    """
    images = np.asarray(images)
    n, h, w, _ = images.shape
    cols = cols or n
    rows = -(-n // cols)
    th, tw = h * scale, w * scale
    font = ImageFont.load_default()
    wrap = max(8, tw // 6)
    cap_lines = 0
    if captions is not None:
        cap_lines = max(len(textwrap.wrap(c or '""', wrap)) for c in captions)
    cap_h = 12 * cap_lines + (4 if cap_lines else 0)
    label_w = 0
    if row_labels is not None:
        label_w = 8 + 6 * max(len(s) for s in row_labels)
    pad = 4
    out = Image.new("RGB", (label_w + cols * (tw + pad) + pad, rows * (th + cap_h + pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    for i in range(n):
        r, c = divmod(i, cols)
        x0 = label_w + pad + c * (tw + pad)
        y0 = pad + r * (th + cap_h + pad)
        tile = Image.fromarray(images[i]).resize((tw, th), Image.NEAREST)
        out.paste(tile, (x0, y0))
        if captions is not None:
            for j, line in enumerate(textwrap.wrap(captions[i] or '""', wrap)):
                draw.text((x0, y0 + th + 2 + 12 * j), line, fill="black", font=font)
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            draw.text((4, pad + r * (th + cap_h + pad) + th // 2), label, fill="black", font=font)
    return np.asarray(out)


def save_png(path: str | pathlib.Path, image: np.ndarray) -> pathlib.Path:
    """Writes `image` (uint8 [H, W, 3]) to `path` atomically: into a temporary file next to it,
    then renamed over it, so `path` holds the old file or the whole new one, never a part."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            Image.fromarray(np.asarray(image)).save(fh, format=Image.registered_extensions().get(
                path.suffix.lower(), "PNG"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_image(path: str | pathlib.Path, size: int | None = None, *, channels: int = 3) -> np.ndarray:
    """Reads an image file as uint8 [H, W, channels]; clear ValueError when it is not an image."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if size is not None and im.size != (size, size):
                raise ValueError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
            arr = np.asarray(im)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    return arr if channels == 3 else arr[..., None]
