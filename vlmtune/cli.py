"""The `vlmtune` command: a thin layer that maps each subcommand to one library function."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

from vlmtune import __version__
from vlmtune.data.images import DEFAULT_MAX_PIXELS

EXIT_BAD_DATA = 1
EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3  # `vlmtune plan --gpu-mem`: the run would not fit
EXIT_INTERRUPTED = 130


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help shows its default (unless it has none, or says it); descriptions and the key
    list keep their line breaks."""

    def _get_help_string(self, action):  # the hook argparse's own ArgumentDefaultsHelpFormatter uses
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _keys_help() -> str:
    from vlmtune.config import describe_keys

    lines = ["config keys (YAML sections, or key=value overrides):"]
    lines += [f"  {key:<28} {default:<14} {text}" for key, default, text in describe_keys()]
    return "\n".join(lines)


def cmd_train(args) -> int:
    from vlmtune.config import load_config
    from vlmtune.console import console
    from vlmtune.training.run import TrainingInterrupted, train

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any process starts
    if args.nproc > 1:
        from vlmtune.training.distributed import launch

        extra = (["--resume"] * args.resume + ["--force-resume"] * args.force_resume
                 + (["--resume-from", args.resume_from] if args.resume_from else []))
        return launch(args.config, args.overrides, args.nproc, extra)
    try:
        train(cfg, resume=args.resume_from or (True if args.resume else None), force_resume=args.force_resume)
    except TrainingInterrupted as stop:
        command = shlex.join(["vlmtune", "train", args.config, *args.overrides, "--resume"])
        console.print(f"[yellow]interrupted[/] at step {stop.step} of {stop.max_steps}; loss curve: "
                      f"{Path(cfg.output.dir) / 'loss.png'}")
        if stop.checkpoint is None:
            console.print(f"no checkpoint was complete yet (train.save_steps={cfg.train.save_steps}): "
                          "nothing to resume from; the run must start again")
        else:
            console.print(f"newest complete checkpoint: {stop.checkpoint}\nresume with: {command}")
        return EXIT_INTERRUPTED
    return 0


def cmd_plan(args) -> int:
    from vlmtune.config import load_config
    from vlmtune.console import console, gib, memory_table
    from vlmtune.tuning.memory import estimate, parse_size, suggestions

    budget = parse_size(args.gpu_mem) if args.gpu_mem else None
    cfg = load_config(args.config, args.overrides)
    result = estimate(cfg, args.nproc, args.labelled)
    console.print(memory_table(result, args.nproc))
    if result.offloaded:
        console.print(f"offloaded to CPU memory: {gib(result.offloaded)} GiB per process")
    if budget is None:
        return 0
    if result.total <= budget:
        console.print(f"[green]fits[/]: {gib(result.total)} of {gib(budget)} GiB per device")
        return 0
    console.print(f"[red]does not fit[/]: {gib(result.total)} GiB per device, {gib(budget)} available. Changes, each alone:")
    for text, total in suggestions(cfg, args.nproc, budget, args.labelled):
        console.print(f"  {text:<55} {gib(total)} GiB {'(fits)' if total <= budget else ''}")
    return EXIT_DOES_NOT_FIT


def cmd_data_check(args) -> int:
    from vlmtune.console import console
    from vlmtune.data.check import check_data, encode_checked

    report = check_data(args.files, args.images_root, args.max_image_pixels)
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


DEVICE_HELP = "auto (the first CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N"


def cmd_generate(args) -> int:
    from vlmtune.console import console
    from vlmtune.inference.generate import generate_predictions, write_predictions

    predictions, problems = generate_predictions(args.model, args.data, args.images_root, args.batch_size,
                                                 args.max_new_tokens, device=args.device)
    write_predictions(predictions, args.out)
    for problem in problems:
        console.print(f"[yellow]skipped[/] {problem}")
    console.print(f"wrote {len(predictions)} predictions to {args.out} ({len(problems)} sample(s) skipped)")
    return 0


def cmd_eval(args) -> int:
    from vlmtune.console import console
    from vlmtune.inference.generate import evaluate

    result = evaluate(args.model, args.data, out=args.out, images_root=args.images_root, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, device=args.device)
    console.print(f"exact-match accuracy {result['accuracy']:.4f} ({result['correct']}/{result['evaluated']}; "
                  f"{result['skipped']} skipped); per-sample results: {args.out}")
    return 0


def cmd_chat(args) -> int:
    from vlmtune.inference.chat import chat

    chat(args.model, image=args.image, max_new_tokens=args.max_new_tokens, device=args.device)
    return 0


def cmd_inspect(args) -> int:
    from rich.table import Table

    from vlmtune.checkpoints.inspect import describe
    from vlmtune.console import console, human_count

    info = describe(args.path, trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    console.print(f"[bold]{info['path']}[/]: {info.get('layout')}"
                  + (f" — {info['architecture']}" if info.get("architecture") else "")
                  + (f" — family {info['family']}" if info.get("family") else ""))
    table = Table(title="components")
    for column in ("component", "tensors", "params", "dtypes", "tuned"):
        table.add_column(column)
    for name, group in info["components"].items():
        table.add_row(name, str(group["tensors"]), human_count(group["params"]), ",".join(group["dtypes"]),
                      (info.get("tuned") or {}).get(name, "-"))
    console.print(table)
    for key in ("adapter", "needs_base", "needs", "state", "trainer_state"):
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


def refuse_existing_out(out, overwrite: bool) -> None:
    from vlmtune.checkpoints.save import refuse_existing_out as refuse

    refuse(Path(out), overwrite)


def cmd_merge(args) -> int:
    from vlmtune.convert.export import check_out
    from vlmtune.convert.merge import assemble, parts_from
    from vlmtune.models.parts import Parts

    check_out(args.out, folder=True)
    refuse_existing_out(args.out, args.overwrite)
    paths = {k: Path(v) if v else None for k, v in vars(args).items()
             if k in ("base", "llm", "vision", "llm_adapter", "vision_adapter", "projector", "weights")}
    parts = Parts(**paths)
    if args.from_dir:
        parts = parts_from(Path(args.from_dir), parts)
    loaded = assemble(parts)
    return _write(loaded, args.out, {"merged_from": {k: str(v) for k, v in vars(parts).items() if v and k != "notes"}})


def cmd_convert(args) -> int:
    from vlmtune.convert.export import check_out
    from vlmtune.convert.foreign import convert
    from vlmtune.models.family import ConvertOptions, LoadOptions

    check_out(args.out, folder=True)
    refuse_existing_out(args.out, args.overwrite)
    options = ConvertOptions(vision=Path(args.vision) if args.vision else None, llm=Path(args.llm) if args.llm else None,
                             allow_unused=args.allow_unused, allow_missing=args.allow_missing,
                             chat_template=args.chat_template, command="convert")
    loaded = convert(args.source, options, LoadOptions(trust_remote_code=args.trust_remote_code))
    return _write(loaded, args.out, {"converted_from": str(args.source)})


def cmd_export(args) -> int:
    from vlmtune.console import console
    from vlmtune.convert.export import check_out, export

    check_out(args.out, folder=args.format == "hf")  # the wrong kind of --out is named before --overwrite matters
    refuse_existing_out(args.out, args.overwrite)
    console.print(f"[green]exported[/] {export(args.model, args.format, args.out, args.dtype)}")
    return 0


def cmd_demo(args) -> int:
    from vlmtune.demo import DEMOS

    DEMOS[args.family].run(args.out, args.train_images, args.eval_images, args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune", description="Fine-tune vision-language models.",
                                     epilog="`vlmtune COMMAND --help` shows each command's options with their defaults.")
    parser.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config", epilog=_keys_help(), formatter_class=HelpFormatter,
                       description="Example: vlmtune train examples/stage2_lora.yaml tune.llm=lora train.lr=2e-4")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. tune.llm=lora train.lr=2e-5")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output.dir from its newest intact checkpoint")
    p.add_argument("--resume-from", metavar="CHECKPOINT", help="continue the run from this checkpoint folder")
    p.add_argument("--force-resume", action="store_true",
                   help="resume even if the checkpoint's config, data or base model differ from this run's")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine (torchrun; one per GPU, or gloo on the CPU)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="estimate peak memory per device before any weights load",
                       formatter_class=HelpFormatter,
                       description="Example: vlmtune plan examples/stage2_lora.yaml --gpu-mem 24GiB --nproc 2")
    p.add_argument("config", help="YAML config file (the run to plan)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for train")
    p.add_argument("--gpu-mem", metavar="SIZE", help="memory per device, e.g. 24GiB: say whether the run fits")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="processes (GPUs) the run uses")
    p.add_argument("--labelled", type=float, default=0.5,
                   help="share of tokens that carry a label (the logits kept), default 0.5")
    p.set_defaults(func=cmd_plan)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="validate data files before training", formatter_class=HelpFormatter,
                        description="Example: vlmtune data check train.jsonl --model runs/stage1")
    p.add_argument("files", nargs="+", help="JSON or JSON Lines data files")
    p.add_argument("--model", help="also tokenize against this model's processor and chat template")
    p.add_argument("--images-root", help="folder image paths are relative to (default: each file's folder)")
    p.add_argument("--max-length", type=int, default=2048, help="token budget per sample (with --model)")
    p.add_argument("--loss-on", choices=["assistant", "last_turn", "all"], default="assistant",
                   help="which tokens are trained (with --model): every assistant turn, the last one, or all text")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images with more pixels are problems (data.max_image_pixels)")
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
        p = sub.add_parser(name, help=text, formatter_class=HelpFormatter,
                           description=f"Example: vlmtune {name} runs/stage2 --data eval.jsonl"
                           + (" --out preds.jsonl" if name == "generate" else ""))
        p.add_argument("model", help="model folder (full model, LoRA adapter or delta)")
        p.add_argument("--data", required=True, help="data file; the last assistant turn is the target")
        if name == "generate":
            p.add_argument("--out", required=True, help="JSON Lines file for the predictions")
        else:
            p.add_argument("--out", default="eval_results.jsonl",
                           help="JSON Lines file for per-sample results (default: %(default)s, in the current folder)")
        p.add_argument("--images-root", help="folder image paths are relative to (default: the data file's folder)")
        p.add_argument("--batch-size", type=int, default=8, help="samples generated together")
        p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        p.set_defaults(func=func)

    p = sub.add_parser("chat", help="chat interactively (streams tokens)", formatter_class=HelpFormatter,
                       description="Example: vlmtune chat runs/stage2 --image cat.png   (then /image, /reset, /quit)")
    p.add_argument("model", help="model folder (full model, LoRA adapter or delta)")
    p.add_argument("--image", help="image for the first message (checked before the model loads)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="say what a model folder, checkpoint, adapter or weight file is",
                       formatter_class=HelpFormatter,
                       description="Example: vlmtune inspect runs/stage2/checkpoint-500 --json")
    p.add_argument("path", help="folder or weight file (.safetensors, .bin, .pth)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model code a folder names in its config (`auto_map`); only for folders you trust")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check hashes, load the model and run one forward pass",
                       formatter_class=HelpFormatter,
                       description="Example: vlmtune verify runs/stage2   (exit 0 only when every check passes)")
    p.add_argument("path", help="model folder or checkpoint written by vlmtune")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("merge", help="combine a base with LoRA adapters and a projector into one model folder",
                       formatter_class=HelpFormatter,
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

    p = sub.add_parser("convert", help="turn a foreign layout (original LLaVA, OpenBMB MiniCPM-V 2.x) into a vlmtune folder",
                       formatter_class=HelpFormatter,
                       description="Examples: vlmtune convert llava-v1.5-7b --vision clip-vit-l-336 --out llava-hf   |   "
                       "vlmtune convert mm_projector.bin --vision clip --llm vicuna --out stage1-hf")
    p.add_argument("source", help="original-LLaVA folder (full, LoRA or stage-1 output), transformers folder, or a "
                   "projector file")
    p.add_argument("--vision", help="vision tower folder (for a projector file, or instead of the tower the source "
                   "names, e.g. a hub id that is not on disk)")
    p.add_argument("--llm", help="LLM folder (for a projector file, or instead of the base LLM the source names)")
    p.add_argument("--chat-template", help="the conversation format the source was trained with: a built-in "
                   "(vicuna_v1, llama_2, mistral_instruct, chatml, default) or a .jinja file; default: read from the source")
    p.add_argument("--allow-unused", action="store_true", help="convert even if some source tensors are not used "
                   "(never drops modules that compute)")
    p.add_argument("--allow-missing", action="store_true", help="convert even if some parameters are not in the source")
    p.add_argument("--trust-remote-code", action="store_true", help="run the source folder's own model code")
    p.add_argument("--out", required=True, help="output folder (written only if the whole conversion succeeds)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a model as a full folder or one state-dict file",
                       formatter_class=HelpFormatter,
                       description="Example: vlmtune export runs/stage2 --format pth --dtype bf16 --out model.pth")
    p.add_argument("model", help="model folder (full, LoRA adapter or delta)")
    p.add_argument("--format", choices=["hf", "safetensors", "pth", "xtuner-pth"], default="hf",
                   help="xtuner-pth: XTuner's LLaVAModel key names, for its pretrained_pth")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast the weights (default: as saved)")
    p.add_argument("--out", required=True, help="a new folder (hf) or file (the other formats)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="train a tiny VLM from scratch on synthetic shapes and report accuracy",
                       formatter_class=HelpFormatter,
                       description="Example: vlmtune demo --out demo-out")
    from vlmtune.demo import DEMOS

    p.add_argument("--out", help="output folder (data, models, report.json); default: "
                   + ", ".join(f"{name}: {demo.out}" for name, demo in DEMOS.items()))
    p.add_argument("--train-images", type=int, help="synthetic training images to render; default: "
                   + ", ".join(f"{name}: {demo.train_images}" for name, demo in DEMOS.items()))
    p.add_argument("--eval-images", type=int, help="held-out images for the accuracy; default: "
                   + ", ".join(f"{name}: {demo.eval_images}" for name, demo in DEMOS.items()))
    p.add_argument("--seed", type=int, default=0, help="seed for the data, the model and training")
    p.add_argument("--family", choices=tuple(DEMOS), default="llava",
                   help="; ".join(f"{name}: {demo.help}" for name, demo in DEMOS.items()))
    p.set_defaults(func=cmd_demo)

    for name in ("merge", "convert", "export"):
        sub.choices[name].add_argument("--overwrite", action="store_true",
                                       help="replace an existing --out (the old one is deleted only once the new one is complete)")
    for p in [sub.choices[name] for name in ("train", "generate", "eval", "chat", "inspect", "merge", "export")] + [data.choices["check"]]:
        p.add_argument("--no-verify", action="store_true",
                       help="load vlmtune folders without checking their files against vlmtune.json first")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # bitsandbytes (imported by peft when installed) warns at import about an optional CPU kernel package
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from vlmtune.checkpoints.load import ModelLoadError, remote_code_refused
    from vlmtune.checkpoints.manifest import ManifestError, set_load_checks
    from vlmtune.checkpoints.save import DiskFullError, OutputExistsError
    from vlmtune.config import ConfigError
    from vlmtune.console import console
    from vlmtune.models.weights import ConversionError
    from vlmtune.data.records import DataError
    from vlmtune.data.templates import TemplateError
    from vlmtune.models.family import FamilyError
    from vlmtune.models.images import ImageBlockMismatch
    from vlmtune.tuning.plan import PlanError

    from rich.markup import escape

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    set_load_checks(not getattr(args, "no_verify", False))
    try:
        return args.func(args)
    except (ConfigError, ModelLoadError, ConversionError, FileNotFoundError, FamilyError, PlanError, TemplateError,
            ImageBlockMismatch, ManifestError, DiskFullError, OutputExistsError) as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        return EXIT_USAGE
    except DataError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        return EXIT_BAD_DATA
    except ValueError as err:
        if remote_code_refused(err) is None:
            raise
        console.print(f"[red]error:[/] {remote_code_refused(err)}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
