"""Command line: ``python -m trainer <command>``.

Every command reports a user error as one line on stderr and exits non-zero; a traceback
is shown only for bugs (or with ``SHINKANSEN_DEBUG=1``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be H,W (e.g. 64,64), got {text!r}") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise argparse.ArgumentTypeError(f"--size {text}: height and width must be positive multiples of 8")
    return h, w


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint (.safetensors/.ckpt); default: the embedded tiny model")
    p.add_argument("--vae", help="a separate VAE file replacing the checkpoint's VAE")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction"],
                   help="override the prediction type (default: from NAME.yaml beside the checkpoint, else ε)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default: per model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Shinkansen LoRA trainer")
    sub = parser.add_subparsers(dest="command")

    g = sub.add_parser("generate", help="draw images with a model (the sampler the Samples tab uses)")
    g.add_argument("--prompt", required=True, action="append",
                   help="repeat for several prompts: one grid row per prompt")
    g.add_argument("--negative", default="")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="apply a LoRA file at a weight (default 1); repeatable")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg", type=float, default=5.0)
    g.add_argument("--size", type=_size, default=None, help="H,W in pixels (default: the model's native size)")
    g.add_argument("--sampler", choices=["ddim", "euler"], default="ddim")
    g.add_argument("--clip-skip", type=int, default=None)
    g.add_argument("-n", "--num-images", type=int, default=1,
                   help="images per prompt, seeds seed, seed+1, …: one grid column each")
    g.add_argument("-o", "--output", required=True, help="PNG file to write")
    _add_model_args(g)

    tr = sub.add_parser("train", help="run a training job from a settings/preset JSON (ours or TrainTrain's)")
    tr.add_argument("job", help="JSON file: a preset, a saved run, or a TrainTrain settings file")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    tr.add_argument("--model", help="checkpoint; default: the job's model_checkpoint, else the embedded model")
    tr.add_argument("--lora-dir", help="where LoRA files go (default ./output)")
    tr.add_argument("--device", default=None)
    tr.add_argument("--log-dir", help="loss CSVs, samples and training states (default ./logs)")
    tr.add_argument("--json-dir", help="run settings files when save_as_json (default ./json)")

    t = sub.add_parser("toy", help="write a dataset of the procedural shapes world (see --help)", add_help=False)
    t.add_argument("toy_args", nargs=argparse.REMAINDER)
    sub.add_parser("inspect", help="JSON report of a LoRA file: keys, modules per block, norms, metadata")
    sub.add_parser("resize", help="LoRA tools: re-factor a LoRA to a lower rank by SVD (fixed or sv_* rules)")
    sub.add_parser("merge", help="LoRA tools: LoRAs into a checkpoint, or several LoRAs into one")
    sub.add_parser("extract", help="LoRA tools: a LoRA from the difference of two checkpoints")
    sub.add_parser("bench", help="measure LoRA training speed and memory (tiny, SD1.5, SDXL), side by side with kohya")
    sub.add_parser("demo", help="make a toy dataset, train a LoRA on the embedded model, plot and compare")
    from .app.server import add_serve_args
    sv = sub.add_parser("serve", help="serve the tab and the HTTP API (the default with no command)")
    add_serve_args(sv)

    q = sub.add_parser("queue", help="the job queue the app runs: add, list, rm")
    qsub = q.add_subparsers(dest="queue_command", required=True)
    qa = qsub.add_parser("add", help="queue a job from a settings/preset JSON (ours or TrainTrain's)")
    qa.add_argument("job", help="JSON file")
    qa.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    qa.add_argument("--front", action="store_true", help="run it next")
    ql = qsub.add_parser("list", help="jobs in queue order")
    ql.add_argument("--json", action="store_true", help="machine-readable output")
    qr = qsub.add_parser("rm", help="delete jobs that are not running")
    qr.add_argument("ids", nargs="+", type=int)
    for sp in (qa, ql, qr):
        sp.add_argument("--root", default=None, help="extension folder holding jobs.sqlite (default: this checkout)")
        sp.add_argument("--lora-dir", help="LoRA folder the app writes to (checked for existing files on add)")

    pl = sub.add_parser("plot", help="plot loss CSVs (ours or TrainTrain's) to a PNG")
    pl.add_argument("csv", nargs="+")
    pl.add_argument("-o", "--output", required=True, help="PNG file to write")
    pl.add_argument("--title", default="")

    sub.add_parser("caption", help="write a caption beside every image of a folder (WD14, BLIP, Florence-2)",
                   add_help=False)
    pt = sub.add_parser("pretrain-tiny", help="pretrain the embedded tiny model (long; resumable)", add_help=False)
    pt.add_argument("pretrain_args", nargs=argparse.REMAINDER)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_to_file
    path = generate_to_file(
        prompts=args.prompt, loras=args.lora, negative=args.negative, seed=args.seed, steps=args.steps, cfg=args.cfg,
        size=args.size, sampler=args.sampler, clip_skip=args.clip_skip, num_images=args.num_images,
        output=Path(args.output), model=args.model, vae=args.vae, prediction=args.prediction,
        tokenizer=args.tokenizer, device=args.device, log=lambda m: print(m, file=sys.stderr))
    print(f"saved: {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .runner import run_job
    from .settings import Settings
    path = Path(args.job)
    if not path.is_file():
        raise UserError(f"{path}: job file not found")
    settings = Settings.from_json(path)
    for warning in settings.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.set:
        settings = settings.apply_set_args(args.set)
    if args.model:
        settings = settings.with_overrides(model_checkpoint=args.model)
    from .dist import under_torchrun
    if settings.processes > 1 and not under_torchrun():   # N local processes: torchrun runs this command N times
        from .launch import relaunch
        return relaunch(path, settings.processes, args)
    import signal
    from .engine import StopRequest
    from .events import ConsoleProgress
    from .launch import worker_hooks
    stop = StopRequest()
    events, closers = worker_hooks(stop, [ConsoleProgress()])   # the app's torchrun launch reports via files

    def on_interrupt(signum, frame):   # first Ctrl-C: Stop & Save; a second one aborts
        if stop.mode is None:
            print("\nstopping after this step and saving (Ctrl-C again to abort)", file=sys.stderr)
            stop.request("save")
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    if under_torchrun():   # torchrun passes Ctrl-C on to its workers as SIGTERM: Stop & Save there too
        signal.signal(signal.SIGTERM, on_interrupt)
    try:
        result = run_job(settings, lora_dir=Path(args.lora_dir) if args.lora_dir else None, device=args.device,
                         stop=stop, events=events, log_dir=args.log_dir, json_dir=args.json_dir)
    finally:
        signal.signal(signal.SIGINT, previous)
        for closer in closers:
            closer.close()
    for p in result.saved:
        print(f"saved: {p}")
    return 0 if result.status == "done" else 3


def cmd_toy(args: argparse.Namespace) -> int:
    from .world import toy
    return toy.main(args.toy_args)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .world import pretrain
    return pretrain.main(args.pretrain_args)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo
    return demo.main(args.demo_args)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    return bench.main(args.bench_args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .tools import inspect_lora
    return inspect_lora.main(args.inspect_args)


def cmd_serve(args: argparse.Namespace) -> int:
    from .app.server import serve
    return serve(args)


def _queue_host(args: argparse.Namespace):
    from .engine import ROOT
    from .app.host import Host
    root = Path(args.root).resolve() if args.root else ROOT
    return Host(root=root, lora_dir=Path(args.lora_dir).resolve() if args.lora_dir else root / "output")


def cmd_queue(args: argparse.Namespace) -> int:
    """Works on the database directly (no worker here): a running app picks added jobs up within a second."""
    import json
    from .app.jobs import JobQueue
    from .settings import Settings
    queue = JobQueue(_queue_host(args))
    if args.queue_command == "add":
        path = Path(args.job)
        if not path.is_file():
            raise UserError(f"{path}: job file not found")
        settings = Settings.from_json(path).apply_set_args(args.set)
        job = queue.add(settings, front=args.front)
        print(f"added: job #{job.id} {job.name} ({job.mode})")
        for advice in settings.advice():
            print(f"warning: {advice}", file=sys.stderr)
    elif args.queue_command == "list":
        jobs = queue.list()
        if args.json:
            print(json.dumps([j.to_dict(with_settings=False) for j in jobs], indent=1))
        for j in [] if args.json else jobs:
            print(f"#{j.id:<4} {j.state:<11} {j.mode:<12} {j.name:<24} {j.message}")
    else:
        for job_id in args.ids:
            job = queue.delete(job_id)
            print(f"deleted: job #{job.id} {job.name}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .app.plot import plot_files
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: the output must be a .png file")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: output folder does not exist")
    print(f"saved: {plot_files([Path(c) for c in args.csv], out, args.title)}")
    return 0


COMMANDS = {"serve": cmd_serve, "queue": cmd_queue, "plot": cmd_plot, "inspect": cmd_inspect, "generate": cmd_generate, "train": cmd_train, "demo": cmd_demo, "bench": cmd_bench, "toy": cmd_toy, "pretrain-tiny": cmd_pretrain}


PASS_THROUGH = {"inspect": "inspect_args", "toy": "toy_args", "pretrain-tiny": "pretrain_args", "demo": "demo_args", "bench": "bench_args"}


def cmd_caption(args: argparse.Namespace) -> int:
    from .caption import cli as caption_cli
    return caption_cli.main(args.caption_args)


COMMANDS["caption"], PASS_THROUGH["caption"] = cmd_caption, "caption_args"


def _lora_tool(name: str):
    """``resize``/``merge``/``extract``: each tool module parses its own arguments (trainer/tools)."""
    def run(args: argparse.Namespace) -> int:
        import importlib
        return importlib.import_module(f".tools.{name}", __package__).main(getattr(args, f"{name}_args"))
    return run


for _tool in ("resize", "merge", "extract"):
    COMMANDS[_tool] = _lora_tool(_tool)
    PASS_THROUGH[_tool] = f"{_tool}_args"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:   # sub-tools with their own argument parsers
        command, args = argv[0], argparse.Namespace(**{PASS_THROUGH[argv[0]]: argv[1:]})
    else:
        parser = build_parser()
        if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
            argv = ["serve", *argv]          # no command: serve the app
        args = parser.parse_args(argv)
        command = args.command
    try:
        return COMMANDS[command](args)
    except UserError as e:
        if os.environ.get("SHINKANSEN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
