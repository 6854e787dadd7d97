"""MiniCPM-V 2.x processor: the tokenizer plus the slicing image processor.

Text marks an image with `(<image>./</image>)` (as OpenBMB's `chat` writes it); each mark becomes its
image's placeholder block (`replace_image_token`), numbered per sample with `<image_id>i</image_id>`
when `use_image_id` (2.6). Implements transformers 5's image protocol (`image_token`,
`replace_image_token`, `_process_images`) so generic encoders get exactly the ids `__call__` gives.
Self-contained: this file travels into the model folders vlmtune writes.
"""

from transformers import BatchFeature, ProcessorMixin


class MiniCPMVProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"
    image_token = "(<image>./</image>)"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template or tokenizer.chat_template, **kwargs)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_processor.unk)  # the placeholder token
        self.default_use_image_id = bool(image_processor.use_image_id)

    def replace_image_token(self, image_inputs, image_idx, **kwargs) -> str:
        grid = tuple(image_inputs["image_grids"][image_idx].tolist())
        return self.image_processor.placeholder(grid if grid[0] else None)

    def _process_images(self, images, max_slice_nums=None, **kwargs):
        processed = self.image_processor(images, max_slice_nums=max_slice_nums)
        blocks = [self.replace_image_token(processed, i) for i in range(len(processed["image_grids"]))]
        return processed, blocks

    def _prepend_local_ids(self, text, replacements, token):
        """`<image_id>i</image_id>` before each block, i counting a sample's images from 0."""
        out, index = [], 0
        ip = self.image_processor
        for sample in text:
            for local in range(sample.count(token)):
                out.append(f"{ip.im_id_start}{local}{ip.im_id_end}" + replacements[index])
                index += 1
        return out

    def __call__(self, text=None, images=None, return_tensors="pt", max_slice_nums=None, use_image_id=None,
                 **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        found = sum(t.count(self.image_token) for t in texts)
        if found != len(images or []):
            raise ValueError(f"the text has {found} {self.image_token} mark(s) but {len(images or [])} image(s) were given")
        data = {}
        if images:
            processed, blocks = self._process_images(images, max_slice_nums)
            if self.default_use_image_id if use_image_id is None else use_image_id:
                blocks = self._prepend_local_ids(texts, blocks, self.image_token)
            blocks, expanded = iter(blocks), []
            for t in texts:
                pieces = t.split(self.image_token)
                expanded.append(pieces[0] + "".join(next(blocks) + p for p in pieces[1:]))
            texts = expanded
            data = {"pixel_values": processed["pixel_values"], "tgt_sizes": processed["tgt_sizes"]}
        kwargs.setdefault("padding", len(texts) > 1)
        bos = self.tokenizer.bos_token  # a template that writes BOS itself gets no second one
        kwargs.setdefault("add_special_tokens", not (bos and all(t.startswith(bos) for t in texts)))
        encoded = self.tokenizer(texts, return_tensors=return_tensors, **kwargs)
        return BatchFeature({**encoded, **data}, tensor_type=return_tensors)

    def save_pretrained(self, save_directory, **kwargs):
        """Also `preprocessor_config.json` on its own, where OpenBMB's code and transformers 4 look for it."""
        out = super().save_pretrained(save_directory, **kwargs)
        self.image_processor.save_pretrained(save_directory)
        return out

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
