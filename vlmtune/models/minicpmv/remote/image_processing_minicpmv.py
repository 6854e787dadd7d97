"""MiniCPM-V 2.x image slicing, read from OpenBMB's `preprocessor_config.json` fields.

An image becomes an overview (resized to about `scale_resolution`^2 pixels, sides multiples of
`patch_size`) and, when larger than that, a grid of up to `max_slice_nums` slices (the grid whose
aspect ratio is closest to the image's). Each is normalised and its patches laid in one row:
[3, P, n_patches * P], with `tgt_sizes` (patch rows, cols). A batch's slices are zero-padded along the
width and stacked. Self-contained: this file travels into the model folders vlmtune writes.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor


def _divisible(length: float, unit: int) -> int:
    return max(round(length / unit) * unit, unit)


class MiniCPMVImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "tgt_sizes"]

    def __init__(self, max_slice_nums=9, scale_resolution=448, patch_size=14, image_feature_size=64,
                 slice_mode=True, use_image_id=False, norm_mean=(0.5, 0.5, 0.5), norm_std=(0.5, 0.5, 0.5),
                 im_start="<image>", im_end="</image>", slice_start="<slice>", slice_end="</slice>", unk="<unk>",
                 im_id_start="<image_id>", im_id_end="</image_id>", version=2.6, **kwargs):
        super().__init__(**kwargs)
        self.max_slice_nums, self.scale_resolution, self.patch_size = max_slice_nums, scale_resolution, patch_size
        self.image_feature_size, self.slice_mode, self.use_image_id = image_feature_size, slice_mode, use_image_id
        self.norm_mean, self.norm_std = list(norm_mean), list(norm_std)
        self.im_start, self.im_end, self.slice_start, self.slice_end = im_start, im_end, slice_start, slice_end
        self.unk, self.im_id_start, self.im_id_end, self.version = unk, im_id_start, im_id_end, version

    # -- geometry (sizes are (width, height)) --
    def best_resize(self, size, allow_upscale=False):
        width, height = size
        if width * height > self.scale_resolution ** 2 or allow_upscale:
            ratio = width / height
            height = int(self.scale_resolution / math.sqrt(ratio))
            width = int(height * ratio)
        return _divisible(width, self.patch_size), _divisible(height, self.patch_size)

    def grid(self, size, max_slice_nums=None):
        """(cols, rows) of slices, or None when the overview alone covers the image."""
        max_slices = max_slice_nums or self.max_slice_nums
        width, height = size
        multiple = min(math.ceil(width * height / self.scale_resolution ** 2), max_slices)
        if multiple <= 1 or not self.slice_mode:
            return None
        log_ratio = math.log(width / height)
        candidates = [(m, n // m) for n in (multiple - 1, multiple, multiple + 1) if 1 < n <= max_slices
                      for m in range(1, n + 1) if n % m == 0]
        return min(candidates, key=lambda g: abs(log_ratio - math.log(g[0] / g[1])))

    def slices(self, image: Image.Image, max_slice_nums=None):
        """[overview, slice (row-major)...] and the grid."""
        grid = self.grid(image.size, max_slice_nums)
        if grid is None:
            return [image.resize(self.best_resize(image.size, allow_upscale=True), Image.BICUBIC)], None
        overview = image.resize(self.best_resize(image.size), Image.BICUBIC)
        cols, rows = grid
        cell = self.best_resize((_divisible(image.size[0], cols) / cols, _divisible(image.size[1], rows) / rows),
                                allow_upscale=True)
        refined = image.resize((cell[0] * cols, cell[1] * rows), Image.BICUBIC)
        parts = [refined.crop((c * cell[0], r * cell[1], (c + 1) * cell[0], (r + 1) * cell[1]))
                 for r in range(rows) for c in range(cols)]
        return [overview] + parts, grid

    def to_patch_row(self, image: Image.Image) -> torch.Tensor:
        """[3, H, W] normalised -> [3, P, (H/P * W/P) * P], patches in row-major order."""
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - torch.tensor(self.norm_mean)[:, None, None]) / torch.tensor(self.norm_std)[:, None, None]
        p = self.patch_size
        patches = F.unfold(x[None], (p, p), stride=(p, p))[0]  # [3 * P * P, n]
        return patches.reshape(3, p, p, -1).permute(0, 1, 3, 2).reshape(3, p, -1)

    def __call__(self, images, return_tensors=None, max_slice_nums=None, **kwargs) -> BatchFeature:
        images = [images] if isinstance(images, Image.Image) else [i for i in _flat(images)]
        rows, sizes, grids, counts = [], [], [], []
        for image in images:
            parts, grid = self.slices(image.convert("RGB"), max_slice_nums)
            for part in parts:
                rows.append(self.to_patch_row(part))
                sizes.append((part.size[1] // self.patch_size, part.size[0] // self.patch_size))
            grids.append(grid or (0, 0))
            counts.append(len(parts))
        width = max(r.shape[-1] for r in rows)
        pixel_values = torch.stack([F.pad(r, (0, width - r.shape[-1])) for r in rows])
        return BatchFeature({"pixel_values": pixel_values, "tgt_sizes": torch.tensor(sizes, dtype=torch.long),
                             "image_grids": torch.tensor(grids, dtype=torch.long),
                             "slice_counts": torch.tensor(counts, dtype=torch.long)})

    def placeholder(self, grid) -> str:
        """The text one image becomes: 2.5 wraps every slice in `<image>` and the grid in one `<slice>`;
        2.6 wraps each slice in `<slice>`. Rows of slices are separated by newlines."""
        unks = self.unk * self.image_feature_size
        text = self.im_start + unks + self.im_end
        cols, rows = grid if grid is not None else (0, 0)
        if not cols:
            return text
        if float(self.version) >= 2.6:
            cell = self.slice_start + unks + self.slice_end
            return text + "\n".join(cell * cols for _ in range(rows))
        cell = self.im_start + unks + self.im_end
        return text + self.slice_start + "\n".join(cell * cols for _ in range(rows)) + self.slice_end


def _flat(images):
    for item in images:
        if isinstance(item, (list, tuple)):
            yield from _flat(item)
        else:
            yield item
