"""One AdamW step over the peers benchmark's LLaVA (every parameter trained), three ways: torch's
default for CPU tensors (a loop over the tensors), its multi-tensor path (`foreach`) and its fused
kernel (what `VlmTrainer.create_optimizer` gets from the Trainer by default). Random gradients; the
step's time does not depend on their values.

    .venv/bin/python benchmarks/optimizer.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packing import make_model  # noqa: E402

KINDS = {"loop (default on CPU)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", default="/tmp/vlmtune-bench-peers")
    args = parser.parse_args()
    params = list(AutoModelForImageTextToText.from_pretrained(make_model(Path(args.work), args.hidden,
                                                                         args.layers)).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    print(f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters in {len(params)} tensors")
    for kind, options in KINDS.items():
        optimizer = torch.optim.AdamW(params, lr=1e-3, **options)
        for _ in range(3):  # states allocated, kernels warm
            optimizer.step()
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        print(f"{kind:<22} {(time.perf_counter() - start) / args.steps * 1000:7.1f} ms a step")


if __name__ == "__main__":
    main()
