"""Mini-Gemini (MGM) processing: one image becomes two inputs, as MGM makes them. The image is padded
to a square with the mean colour (`pad`), resized to `image_size_aux` for the ConvNeXt
(`pixel_values_aux`), and the low-resolution input for the ViT (`pixel_values`) is a bilinear
downsample of that tensor to `image_size`. MGM-HD (`image_grid` 2): the downsample is to
`image_grid * image_size`, cut into image_grid² crops (row by row), and with `image_global` a view of
the whole image at `image_size` follows them. The text gets `views * (image_size / patch_size)²`
placeholders.

Self-contained (imports only transformers and torch): saved folders carry this file.
"""

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor, ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - width) // 2, (side - height) // 2))
    return out


class MGMImageProcessor(CLIPImageProcessor):
    """CLIP preprocessing at the aux resolution, plus the low-resolution view of the same tensor."""

    model_input_names = ["pixel_values", "pixel_values_aux"]

    def __init__(self, image_size: int = 336, image_aspect_ratio: str = "pad", image_grid: int = 1,
                 image_global: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.image_aspect_ratio = image_aspect_ratio
        self.image_grid = image_grid
        self.image_global = image_global

    @property
    def image_views(self) -> int:
        return self.image_grid**2 + (1 if self.image_global and self.image_grid > 1 else 0)

    def preprocess(self, images, *args, **kwargs) -> BatchFeature:
        kwargs.pop("return_tensors", None)
        flat = images if isinstance(images, (list, tuple)) else [images]
        flat = [x for item in flat for x in (item if isinstance(item, (list, tuple)) else [item])]
        if self.image_aspect_ratio == "pad":
            fill = tuple(int(m * 255) for m in self.image_mean)
            flat = [expand_to_square(x.convert("RGB") if isinstance(x, Image.Image) else x, fill) for x in flat]
        aux = super().preprocess(flat, *args, return_tensors="pt", **kwargs)["pixel_values"]
        size, grid = self.image_size, self.image_grid
        low = F.interpolate(aux.float(), size=(size * grid, size * grid), mode="bilinear", align_corners=False)
        if grid > 1:  # [images, 3, grid*size, grid*size] -> [images, grid², 3, size, size], row by row
            crops = low.reshape(len(low), 3, grid, size, grid, size).permute(0, 2, 4, 1, 3, 5).flatten(1, 2)
            if self.image_global:
                whole = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
                crops = torch.cat([crops, whole[:, None]], dim=1)
            low = crops.flatten(0, 1)  # [images * views, 3, size, size]
        low = low.to(aux.dtype)
        return BatchFeature({"pixel_values": low, "pixel_values_aux": aux}, tensor_type="pt")


class MGMProcessor(ProcessorMixin):
    """Tokenizer + `MGMImageProcessor`; each image becomes `num_image_tokens` copies of `image_token`."""

    def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 14, image_token: str = "<image>",
                 chat_template=None, **kwargs):
        self.patch_size = patch_size
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def num_image_tokens(self) -> int:
        per_view = (self.image_processor.image_size // self.patch_size) ** 2
        return getattr(self.image_processor, "image_views", 1) * per_view

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens


__all__ = ["MGMImageProcessor", "MGMProcessor"]
