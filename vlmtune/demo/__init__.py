"""The built-in demos, by name: each trains tiny VLMs from scratch on synthetic images and reports
held-out accuracy. `vlmtune demo --family NAME` looks them up here, so the CLI names none."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Demo:
    runner: str  # "module:function", imported when the demo runs
    out: str  # default output folder
    train_images: int
    eval_images: int
    help: str

    def run(self, out: str | None, train_images: int | None, eval_images: int | None, seed: int) -> dict:
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)(
            out or self.out, train_images=train_images or self.train_images,
            eval_images=eval_images or self.eval_images, seed=seed)


DEMOS = {
    "llava": Demo("vlmtune.demo.run:run_demo", "demo-out", 2000, 200,
                  "a LLaVA model learns shapes, colours, sizes and positions (stage 1, then stage 2)"),
    "mgm": Demo("vlmtune.demo.detail:run_detail_demo", "demo-mgm", 1500, 150,
                "Mini-Gemini (ViT + high-res ConvNeXt) beside LLaVA on textures a low-res view cannot see"),
}
