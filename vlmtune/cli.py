"""The `vlmtune` command: a thin layer that maps each subcommand to one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from vlmtune import __version__

EXIT_BAD_DATA = 1
EXIT_USAGE = 2


def _keys_help() -> str:
    from vlmtune.config import describe_keys

    lines = ["config keys (YAML sections, or key=value overrides):"]
    lines += [f"  {key:<28} {default:<14} {text}" for key, default, text in describe_keys()]
    return "\n".join(lines)


def cmd_train(args) -> int:
    from vlmtune.config import load_config
    from vlmtune.training.run import train

    cfg = load_config(args.config, args.overrides)
    resume = True if args.resume == "auto" else args.resume
    train(cfg, resume=resume)
    return 0


def cmd_data_check(args) -> int:
    from vlmtune.console import console
    from vlmtune.data.check import check_data, encode_checked

    report = check_data(args.files, args.images_root)
    if args.model:
        from vlmtune.checkpoints.load import load_model
        from vlmtune.data.encode import SampleEncoder

        loaded = load_model(args.model)
        encode_checked(report, SampleEncoder(loaded.processor, loaded.family, args.max_length, args.loss_on))
    if args.json:
        print(json.dumps({"summary": report.summary(), "problems": [str(p) for p in report.problems]}, indent=2))
    else:
        for problem in report.problems:
            console.print(f"[red]error[/] {problem}")
        for line in report.summary():
            console.print(line)
        verdict = "[green]OK[/]" if not report.problems else f"[red]{len(report.problems)} problem(s)[/]"
        console.print(f"data check: {verdict}")
    return EXIT_BAD_DATA if report.problems else 0


def cmd_data_show(args) -> int:
    from vlmtune.checkpoints.load import load_model
    from vlmtune.console import console
    from vlmtune.data.check import check_data, encode_checked
    from vlmtune.data.encode import SampleEncoder
    from vlmtune.data.show import as_json, as_text

    report = check_data(args.files, args.images_root)
    loaded = load_model(args.model)
    encode_checked(report, SampleEncoder(loaded.processor, loaded.family, args.max_length, args.loss_on,
                                         args.chat_template))
    encoded = report.encoded
    if args.index is not None:
        if not 0 <= args.index < len(encoded):
            console.print(f"[red]error[/] --index {args.index}: the data has {len(encoded)} usable sample(s) "
                          f"(0..{len(encoded) - 1})")
            return EXIT_BAD_DATA
        encoded = [encoded[args.index]]
    if args.json:
        print(json.dumps([as_json(e) for e in encoded]))
    else:
        for problem in report.problems:
            console.print(f"[red]error[/] {problem}")
        for item in encoded:
            console.print(as_text(item, loaded.processor.tokenizer))
    return EXIT_BAD_DATA if report.problems else 0


def cmd_generate(args) -> int:
    from vlmtune.console import console
    from vlmtune.inference.generate import generate_predictions, write_predictions

    predictions, problems = generate_predictions(args.model, args.data, args.images_root, args.batch_size,
                                                 args.max_new_tokens)
    write_predictions(predictions, args.out)
    for problem in problems:
        console.print(f"[yellow]skipped[/] {problem}")
    console.print(f"wrote {len(predictions)} predictions to {args.out} ({len(problems)} sample(s) skipped)")
    return 0


def cmd_eval(args) -> int:
    from vlmtune.console import console
    from vlmtune.inference.generate import evaluate

    result = evaluate(args.model, args.data, out=args.out, images_root=args.images_root, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens)
    console.print(f"exact-match accuracy {result['accuracy']:.4f} ({result['correct']}/{result['evaluated']}; "
                  f"{result['skipped']} skipped); per-sample results: {args.out}")
    return 0


def cmd_chat(args) -> int:
    from vlmtune.inference.chat import chat

    chat(args.model, image=args.image, max_new_tokens=args.max_new_tokens)
    return 0


def cmd_inspect(args) -> int:
    from rich.table import Table

    from vlmtune.checkpoints.inspect import describe
    from vlmtune.console import console, human_count

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    console.print(f"[bold]{info['path']}[/]: {info.get('layout')}"
                  + (f" — {info['architecture']}" if info.get("architecture") else ""))
    table = Table(title="components")
    for column in ("component", "tensors", "params", "dtypes", "tuned"):
        table.add_column(column)
    for name, group in info["components"].items():
        table.add_row(name, str(group["tensors"]), human_count(group["params"]), ",".join(group["dtypes"]),
                      (info.get("tuned") or {}).get(name, "-"))
    console.print(table)
    for key in ("adapter", "needs_base", "state", "trainer_state"):
        if info.get(key):
            console.print(f"{key}: {json.dumps(info[key], default=str)}")
    return 0


def cmd_verify(args) -> int:
    from vlmtune.checkpoints.verify import verify
    from vlmtune.console import console

    result = verify(args.path)
    for step, passed, detail in result.steps:
        console.print(f"{'[green]ok[/]  ' if passed else '[red]FAIL[/]'} {step}: {detail}")
    console.print(f"verify {args.path}: " + ("[green]OK[/]" if result.ok else "[red]FAILED[/]"))
    return 0 if result.ok else EXIT_BAD_DATA


def _write(loaded, out, record) -> int:
    from vlmtune.checkpoints.verify import verify
    from vlmtune.console import console
    from vlmtune.convert.export import save_converted

    for line in loaded.report():
        console.print(line)
    save_converted(loaded, out, record)
    result = verify(out)
    if not result.ok:
        console.print(f"[red]error:[/] {out} was written but failed verification: {result.steps[-1]}")
        return EXIT_BAD_DATA
    console.print(f"[green]wrote and verified[/] {out}")
    return 0


def cmd_merge(args) -> int:
    from vlmtune.convert.merge import Parts, assemble, xtuner_parts

    paths = {k: Path(v) if v else None for k, v in vars(args).items()
             if k in ("base", "llm", "vision", "llm_adapter", "vision_adapter", "projector", "weights")}
    parts = Parts(**paths)
    if args.from_dir:
        parts = xtuner_parts(Path(args.from_dir), parts)
    loaded = assemble(parts)
    return _write(loaded, args.out, {"merged_from": {k: str(v) for k, v in vars(parts).items() if v and k != "notes"}})


def cmd_convert(args) -> int:
    from vlmtune.convert.foreign import convert

    loaded = convert(args.source, Path(args.vision) if args.vision else None, Path(args.llm) if args.llm else None,
                     allow_unused=args.allow_unused, allow_missing=args.allow_missing)
    return _write(loaded, args.out, {"converted_from": str(args.source)})


def cmd_export(args) -> int:
    from vlmtune.console import console
    from vlmtune.convert.export import export

    console.print(f"[green]exported[/] {export(args.model, args.format, args.out, args.dtype)}")
    return 0


def cmd_demo(args) -> int:
    sizes = {k: v for k, v in (("train_images", args.train_images), ("eval_images", args.eval_images)) if v}
    if args.family == "mgm":  # Mini-Gemini beside LLaVA on a task only the high-resolution encoder can see
        from vlmtune.demo.detail import run_detail_demo

        run_detail_demo(args.out if args.out != "demo-out" else "demo-mgm", seed=args.seed, **sizes)
        return 0
    from vlmtune.demo.run import run_demo

    run_demo(args.out, seed=args.seed, **sizes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune", description="Fine-tune vision-language models.")
    parser.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config", epilog=_keys_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Example: vlmtune train examples/stage2_lora.yaml tune.llm=lora train.lr=2e-4")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. tune.llm=lora train.lr=2e-5")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue the run in output.dir from its newest checkpoint (or from the given checkpoint)")
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="validate data files before training",
                        description="Example: vlmtune data check train.jsonl --model runs/stage1")
    p.add_argument("files", nargs="+", help="JSON or JSON Lines data files")
    p.add_argument("--model", help="also tokenize against this model's processor and chat template")
    p.add_argument("--images-root", help="folder image paths are relative to (default: each file's folder)")
    p.add_argument("--max-length", type=int, default=2048, help="token budget per sample (with --model)")
    p.add_argument("--loss-on", choices=["assistant", "last_turn", "all"], default="assistant")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_data_check)
    p = data.add_parser("show", help="print what samples become: tokens, image blocks, trained tokens highlighted",
                        description="Example: vlmtune data show train.jsonl --model runs/stage1 --index 0")
    p.add_argument("files", nargs="+", help="JSON or JSON Lines data files")
    p.add_argument("--model", required=True, help="model folder whose processor and chat template encode the data")
    p.add_argument("--index", type=int, help="show only this sample (0-based, among usable samples; default: all)")
    p.add_argument("--images-root", help="folder image paths are relative to (default: each file's folder)")
    p.add_argument("--max-length", type=int, default=2048, help="token budget per sample (default: 2048)")
    p.add_argument("--loss-on", choices=["assistant", "last_turn", "all"], default="assistant",
                   help="which tokens are trained (default: assistant)")
    p.add_argument("--chat-template", help="a built-in template name or a .jinja file (default: the model's own)")
    p.add_argument("--json", action="store_true", help="one JSON list: per sample id, input_ids, labels (-100: no loss)")
    p.set_defaults(func=cmd_data_show)

    for name, func, text in (("generate", cmd_generate, "answer every sample of a data file (batched)"),
                             ("eval", cmd_eval, "exact-match accuracy against each sample's last assistant turn")):
        p = sub.add_parser(name, help=text, description=f"Example: vlmtune {name} runs/stage2 --data eval.jsonl"
                           + (" --out preds.jsonl" if name == "generate" else ""))
        p.add_argument("model", help="model folder (full model or LoRA adapter)")
        p.add_argument("--data", required=True, help="data file; the last assistant turn is the target")
        p.add_argument("--out", required=name == "generate", default="eval_results.jsonl",
                       help="JSON Lines file for per-sample results")
        p.add_argument("--images-root", help="folder image paths are relative to")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.set_defaults(func=func)

    p = sub.add_parser("chat", help="chat interactively (streams tokens)",
                       description="Example: vlmtune chat runs/stage2 --image cat.png   (then /image, /reset, /quit)")
    p.add_argument("model", help="model folder (full model or LoRA adapter)")
    p.add_argument("--image", help="image for the first message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="say what a model folder, checkpoint, adapter or weight file is",
                       description="Example: vlmtune inspect runs/stage2/checkpoint-500 --json")
    p.add_argument("path", help="folder or weight file (.safetensors, .bin, .pth)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check hashes, load the model and run one forward pass",
                       description="Example: vlmtune verify runs/stage2   (exit 0 only when every check passes)")
    p.add_argument("path", help="model folder or checkpoint written by vlmtune")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("merge", help="combine a base with LoRA adapters and a projector into one model folder",
                       description="Examples: vlmtune merge --from xtuner-llava-hf --out merged   |   "
                       "vlmtune merge --base runs/stage1 --llm-adapter lora/ --projector mm_projector.bin --out merged")
    p.add_argument("--base", help="a LLaVA model folder")
    p.add_argument("--llm", help="LLM folder (instead of --base, for layouts that keep the LLM separate)")
    p.add_argument("--vision", help="vision encoder folder (with --llm)")
    p.add_argument("--llm-adapter", help="PEFT LoRA adapter for the LLM (on the bare LLM or on the whole VLM)")
    p.add_argument("--vision-adapter", help="PEFT LoRA adapter for the vision encoder")
    p.add_argument("--projector", help="projector folder (XTuner projector/) or file (mm_projector.bin)")
    p.add_argument("--weights", help="a state-dict file (.pth/.bin/.safetensors; transformers or XTuner pretrained_pth "
                   "naming, may be partial) loaded over the base")
    p.add_argument("--from", dest="from_dir", help="an XTuner pth_to_hf folder: finds the parts and xtuner_config.py")
    p.add_argument("--out", required=True, help="output folder (written only if the whole merge succeeds)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("convert", help="turn a foreign layout into a transformers LLaVA folder",
                       description="Examples: vlmtune convert llava-v1.5-7b --vision clip-vit-l-336 --out llava-hf   |   "
                       "vlmtune convert mm_projector.bin --vision clip --llm vicuna --out stage1-hf")
    p.add_argument("source", help="original-LLaVA folder, transformers LLaVA folder, or a projector file")
    p.add_argument("--vision", help="vision tower folder (when the source does not carry it)")
    p.add_argument("--llm", help="LLM folder (for a projector file)")
    p.add_argument("--allow-unused", action="store_true", help="convert even if some source tensors are not used")
    p.add_argument("--allow-missing", action="store_true", help="convert even if some parameters are not filled")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a model as a full folder or one state-dict file",
                       description="Example: vlmtune export runs/stage2 --format pth --dtype bf16 --out model.pth")
    p.add_argument("model", help="model folder (full, LoRA adapter or delta)")
    p.add_argument("--format", choices=["hf", "safetensors", "pth", "xtuner-pth"], default="hf",
                   help="xtuner-pth: XTuner's LLaVAModel key names, for its pretrained_pth")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast the weights")
    p.add_argument("--out", required=True, help="folder (hf) or file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="train a tiny VLM from scratch on synthetic shapes and report accuracy",
                       description="Example: vlmtune demo --out demo-out")
    p.add_argument("--out", default="demo-out", help="output folder (data, models, report.json)")
    p.add_argument("--train-images", type=int, default=None, help="default: 2000 (llava), 1500 (mgm)")
    p.add_argument("--eval-images", type=int, default=None, help="default: 200 (llava), 150 (mgm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=("llava", "mgm"), default="llava",
                   help="mgm: Mini-Gemini (ViT + high-res ConvNeXt) beside LLaVA on 3x3 marks in 128px images")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from vlmtune.checkpoints.load import ModelLoadError
    from vlmtune.config import ConfigError
    from vlmtune.console import console
    from vlmtune.convert.weights import ConversionError
    from vlmtune.data.records import DataError
    from vlmtune.data.templates import TemplateError
    from vlmtune.models.family import FamilyError
    from vlmtune.models.images import ImageBlockMismatch
    from vlmtune.tuning.plan import PlanError

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except (ConfigError, ModelLoadError, ConversionError, FileNotFoundError, FamilyError, PlanError, TemplateError,
            ImageBlockMismatch) as err:
        console.print(f"[red]error:[/] {err}")
        return EXIT_USAGE
    except DataError as err:
        console.print(f"[red]error:[/] {err}")
        return EXIT_BAD_DATA
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
