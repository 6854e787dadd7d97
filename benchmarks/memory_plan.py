"""`vlmtune plan`'s estimate beside the measured peak, on this machine (CPU, fp32).

Each configuration runs in its own process: the model folder loads, the run's tuning plan applies,
and three training steps run as the Trainer runs them (AdamW over the plan's groups, logits only at
labelled positions, a fixed share of labelled tokens). The peak is the process's resident memory,
sampled every millisecond by a thread, minus what it held before the model loaded (imports,
allocator), with glibc set to give freed memory back (`LIVE_MALLOC`; `--keep-malloc` measures with its
defaults, where fragmentation stays resident). Prints predicted vs measured GiB and their ratio.

    .venv/bin/python benchmarks/memory_plan.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "full, seq 512 x 4": ({"vision": "full", "projector": "full", "llm": "full"}, 512, 4, False),
    "full + checkpointing": ({"vision": "full", "projector": "full", "llm": "full"}, 512, 4, True),
    "LoRA LLM, frozen vision": ({"vision": "frozen", "projector": "full", "llm": "lora"}, 512, 4, False),
    "projector only, seq 1024 x 2": ({"vision": "frozen", "projector": "full", "llm": "frozen"}, 1024, 2, False),
}
LABELLED = 0.5
# glibc keeps freed memory resident (its arenas, and large blocks below its mmap threshold), so by default
# the resident set says more about fragmentation than about what the run holds; with these, large blocks
# are mapped and unmapped and freed memory is trimmed, so the resident set follows what is alive
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def make_model(work: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = work / "model"
    if (folder / "config.json").is_file():
        return folder
    from vlmtune.checkpoints.save import save_model_folder
    from vlmtune.models import llava, tiny

    tokenizer = tiny.build_tokenizer(["a b c d e f g h i j k l m n o p"], 300)
    vision = tiny.save_vision_encoder(work / "parts" / "vision", image_size=224, patch_size=16, hidden=256, layers=6,
                                      heads=4)
    llm_dir = work / "parts" / "llm"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=16000, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)

    LlamaForCausalLM(config).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    save_model_folder(*llava.build(str(vision), str(llm_dir)), folder, {"role": "memory benchmark model"})
    return folder


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(model_dir: Path, name: str) -> dict:
    import torch

    from vlmtune.checkpoints.load import load_model
    from vlmtune.config import load_config
    from vlmtune.training.housekeeping import trained_as_training_runs
    from vlmtune.training.trainer import label_positions, supervised_loss
    from vlmtune.tuning.memory import estimate
    from vlmtune.tuning.plan import TuningPlan

    tune, seq, batch, checkpointing = CONFIGS[name]
    cfg = load_config(tree={"model": {"path": str(model_dir)}, "data": {"train": "unused.jsonl", "max_length": seq},
                            "tune": tune, "train": {"batch_size": batch, "gradient_checkpointing": checkpointing,
                                                    "precision": "fp32"},
                            "output": {"dir": "unused"}})
    predicted = estimate(cfg, 1, LABELLED)
    torch.set_num_threads(2)
    baseline, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    loaded = load_model(model_dir)
    plan = TuningPlan(cfg.tune, loaded.family, 1e-4)
    model = plan.apply(loaded.model).train()
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    optimizer = torch.optim.AdamW(plan.param_groups(model, 0.0), lr=1e-4, fused=True)  # as VlmTrainer's
    vision = loaded.model.config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    image_id = loaded.model.config.image_token_id
    torch.manual_seed(0)
    with trained_as_training_runs(model, loaded.family, kept_logits=True) as form:  # as training runs it
        for _ in range(3):
            ids = torch.randint(10, 200, (batch, seq))
            ids[:, 1:1 + image_tokens] = image_id
            labels = ids.clone()
            labels[:, : int(seq * (1 - LABELLED))] = -100
            pixels = torch.randn(batch, 3, vision.image_size, vision.image_size)
            keep = label_positions(labels)
            if form.kept is not None:
                form.kept.mask = keep
            out = model(input_ids=ids, pixel_values=pixels, logits_to_keep=keep, use_cache=False)
            supervised_loss(out, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del out
    done.set()
    thread.join()
    return {"name": name, "predicted": predicted.total, "measured": peak[0] - baseline}


# OpenBMB's published per-GPU memory for MiniCPM-Llama3-V 2.5 fine-tuning (2 x A100, DeepSpeed ZeRO-3 with
# optimizer and parameter offload, max_len 2048, batch 1, gradient checkpointing, bf16): their finetune README
OPENBMB = {"LoRA": 14.4, "full": 16.0}
OPENBMB_TUNES = {  # their finetune_lora.sh / finetune_ds.sh: the vision tower trains in both
    "LoRA": {"vision": "full", "resampler": "full", "llm": "lora",
             "lora": {"r": 64, "alpha": 64, "dropout": 0.05, "targets": {"llm": ["q_proj", "k_proj", "v_proj", "o_proj"]}}},
    "full": {"vision": "full", "resampler": "full", "llm": "full"},
}


def minicpm_llama3_v25():
    """MiniCPM-Llama3-V 2.5 on the meta device: Llama-3-8B, SigLIP-so400m/14 at 980, a 96-query resampler."""
    import torch

    from vlmtune.models.minicpmv.remote.configuration_minicpmv import MiniCPMVConfig
    from vlmtune.models.minicpmv.remote.modeling_minicpmv import MiniCPMV

    config = MiniCPMVConfig(version=2.5, query_num=96, image_size=448, patch_size=14, llm_model_type="llama",
                            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                            rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        return MiniCPMV(config)


def compare_with_openbmb() -> None:
    from vlmtune.config import load_config
    from vlmtune.tuning.memory import estimate

    print(f"\nMiniCPM-Llama3-V 2.5, 2 processes, ZeRO-3 + offload, max_len 2048, batch 1, bf16, checkpointing:")
    print(f"{'tuning':<8} {'predicted GiB':>13} {'OpenBMB GiB':>12} {'offloaded to CPU GiB':>21}")
    for name, tune in OPENBMB_TUNES.items():
        cfg = load_config(tree={"model": {"path": "MiniCPM-Llama3-V-2_5", "dtype": "bfloat16"},
                                "data": {"train": "unused.jsonl", "max_length": 2048}, "tune": tune,
                                "train": {"batch_size": 1, "precision": "bf16", "gradient_checkpointing": True,
                                          "distributed": {"strategy": "deepspeed", "zero_stage": 3,
                                                          "offload_optimizer": True, "offload_params": True}},
                                "output": {"dir": "unused"}})
        result = estimate(cfg, 2, LABELLED, model=minicpm_llama3_v25())
        print(f"{name:<8} {result.total / 2**30:13.2f} {OPENBMB[name]:12.1f} {result.offloaded / 2**30:21.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/vlmtune-bench-memory")
    parser.add_argument("--keep-malloc", action="store_true", help="measure with glibc's default allocator settings "
                        "(freed memory stays resident, so the peak includes what fragmentation keeps)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        print("RESULT " + json.dumps(measure(work / "model", args.child)))
        return
    work.mkdir(parents=True, exist_ok=True)
    make_model(work)
    print(f"{'configuration':<32} {'predicted GiB':>13} {'measured GiB':>12} {'ratio':>6}")
    for name in CONFIGS:
        done = subprocess.run([sys.executable, __file__, "--child", name, "--work", str(work)], capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ, **({} if args.keep_malloc else LIVE_MALLOC)})
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
        row = json.loads(line[7:])
        print(f"{name:<32} {row['predicted'] / 2**30:13.3f} {row['measured'] / 2**30:12.3f} "
              f"{row['predicted'] / row['measured']:6.2f}")
    compare_with_openbmb()


if __name__ == "__main__":
    main()
