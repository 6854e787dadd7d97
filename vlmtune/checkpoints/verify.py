"""`vlmtune verify`: hashes match the manifest, the model loads (with its base), and one forward pass
on a generated image and text gives finite logits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vlmtune.checkpoints.load import load_model
from vlmtune.checkpoints.manifest import MANIFEST, hash_problems, read_manifest
from vlmtune.data.encode import SampleEncoder
from vlmtune.models import images as mm
from vlmtune.models.device import model_device, place
from vlmtune.models.family import LoadOptions


@dataclass
class Verification:
    path: Path
    steps: list[tuple[str, bool, str]] = field(default_factory=list)  # (step, passed, detail)

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.steps)

    def add(self, step: str, passed: bool, detail: str) -> bool:
        self.steps.append((step, passed, detail))
        return passed


def verify_hashes(path: Path, result: Verification) -> bool:
    try:
        manifest = read_manifest(path)
    except ValueError as err:
        return result.add("manifest", False, str(err))
    if manifest is None:
        return result.add("manifest", False, f"{path}/{MANIFEST} is missing: the folder is incomplete or not from vlmtune")
    problems = hash_problems(path, manifest)
    detail = "; ".join(problems) if problems else f"{len(manifest.get('files', {}))} file(s) match their sha256"
    return result.add("hashes", not problems, detail)


def forward_check(loaded) -> tuple[bool, str]:
    """One forward pass on a generated image and a short prompt; logits must be finite."""
    processor, family = loaded.processor, loaded.family
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(48, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()  # any size: the processor resizes
    image = Image.fromarray(pixels)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    encoder = SampleEncoder(processor, family, max_length=1 << 30)
    ids, blocks = encoder.generation_ids(chat, [image])
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              **{k: torch.tensor([v]) for k, v in encoder.extra_inputs(ids).items()},
              **mm.image_inputs(processor, [image], blocks, "verify")}
    model = place(loaded.model)
    device = model_device(model)
    with torch.inference_mode():
        logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
    finite = bool(torch.isfinite(logits).all())
    return finite, f"logits {tuple(logits.shape)} {'finite' if finite else 'contain NaN or inf'}"


def verify(path: str | Path, check_hashes: bool = True, options: LoadOptions | None = None) -> Verification:
    path = Path(path)
    result = Verification(path)
    if check_hashes and not verify_hashes(path, result):
        return result
    try:
        loaded = load_model(path, options=options, check=not check_hashes)  # just hashed in full
    except Exception as err:  # any load failure is the verdict, named
        result.add("load", False, f"{type(err).__name__}: {err}")
        return result
    result.add("load", True, "; ".join(f"{c}: {s}" for c, s in loaded.sources.items()))
    try:
        passed, detail = forward_check(loaded)
    except Exception as err:
        passed, detail = False, f"{type(err).__name__}: {err}"
    result.add("forward", passed, detail)
    return result
