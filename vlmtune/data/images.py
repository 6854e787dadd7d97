"""Images: checked by decoding them (a JPEG cut after its header opens fine and fails only when decoded),
refused or downscaled above a pixel limit, and loaded for training and inference."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

DEFAULT_MAX_PIXELS = 4096 * 4096


def _open(path: Path) -> Image.Image:
    """Open without Pillow's decompression-bomb warning: the pixel limit is ours (`data.max_image_pixels`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def image_problem(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, downscale: bool = False) -> str | None:
    """What is wrong with an image file, or None: missing, unreadable, empty, too large, or not decodable.

    Decoding uses a reduced size where the format allows (JPEG decodes at 1/8 scale), so it stays fast."""
    return inspect_image(path, max_pixels, downscale)[0]


def inspect_image(path: Path, max_pixels: int, downscale: bool) -> tuple[str | None, str | None]:
    """(problem, note): a note says that an image over the limit will be downscaled as it loads."""
    note = None
    try:
        if not path.is_file():
            return f"image {path} does not exist", None
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte in the name
        return f"image path {str(path)[:80]}... cannot be used: {getattr(err, 'strerror', None) or err}", None
    try:
        with _open(path) as image:
            width, height = image.size
            if width == 0 or height == 0:
                return f"image {path} is empty ({width}x{height})", None
            if width * height > max_pixels:
                if not downscale:
                    return (f"image {path} is {width}x{height} = {width * height} pixels, more than data.max_image_pixels="
                            f"{max_pixels}; downscale it, raise the limit or set data.downscale_large_images=true"), None
                note = f"image {path} ({width}x{height}) is downscaled to data.max_image_pixels={max_pixels} as it loads"
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except Image.DecompressionBombError as err:
        return f"image {path} is too large to open safely: {err}", None
    except (OSError, SyntaxError, ValueError) as err:  # Pillow raises all three for broken files
        return f"image {path} cannot be read: {err}", None
    return None, note


def fitted_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) an image loads at: downscaled to `max_pixels` (aspect ratio kept) when larger."""
    if not max_pixels or width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def load_image(path: Path, label: str, max_pixels: int | None = None) -> Image.Image:
    """The image as RGB; larger than `max_pixels` -> downscaled to fit (aspect ratio kept)."""
    try:
        with _open(path) as image:
            size = fitted_size(image.width, image.height, max_pixels)
            if size != image.size:
                image.draft("RGB", size)  # JPEG: decode at a reduced scale first
                return image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:
        raise OSError(f"{label}: cannot load image {path}: {err}") from err


class ImageChecker:
    """Checks each distinct image file once and remembers what was wrong with it (or what will be done to it)."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, downscale: bool = False):
        self.max_pixels = max_pixels
        self.downscale = downscale
        self._seen: dict[Path, tuple[str | None, str | None]] = {}

    def _inspect(self, path: Path) -> tuple[str | None, str | None]:
        if path not in self._seen:
            self._seen[path] = inspect_image(path, self.max_pixels, self.downscale)
        return self._seen[path]

    def problem(self, path: Path) -> str | None:
        return self._inspect(path)[0]

    def note(self, path: Path) -> str | None:
        return self._inspect(path)[1]
