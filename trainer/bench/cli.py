"""Arguments and the interleaved runs of ``python -m trainer bench``.

Every run is its own process (so peak RSS and start → first step are that run's alone), timed
by ``instrument``. With ``--kohya DIR`` each case runs ours, kohya, ours, kohya, … (``--rounds``),
so a machine that slows down or warms up over time hurts both tools alike.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .case import CASES, DEFAULT_RESOLUTION, Case

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: ``--gpu-suite``: the issue's GPU cases (SD1.5 512² batch 4 UNet+TE, SDXL 1024² batch 1 UNet only).
GPU_SUITE = (dict(name="sd15", resolution=512, batch=4, train_text_encoder=True),
             dict(name="sdxl", resolution=1024, batch=1, train_text_encoder=False))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer bench", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--cases", default="tiny,sd15", help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--resolution", type=int, help="image side (default: tiny 64, sd15 512, sdxl 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median (it starts at warmup+1)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the frozen model's precision (auto: fp32 on CPU, bf16 on GPUs that have it)")
    p.add_argument("--blocks", help="UNet blocks that get LoRA layers, comma list (default: all)")
    p.add_argument("--train-text-encoder", default="on", choices=("on", "off", "both"),
                   help="LoRA on the text encoder too (both: one case with, one without)")
    p.add_argument("--kohya", metavar="DIR", help="a kohya-ss/sd-scripts checkout: run it side by side")
    p.add_argument("--kohya-pythonpath", metavar="PATHS",
                   help="folders with kohya's own packages (accelerate, its transformers/diffusers, …), "
                        "put first on its PYTHONPATH (default: $SHINKANSEN_KOHYA_PYTHONPATH)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per case (default 2 with --kohya, else 1)")
    p.add_argument("--tokenizer", metavar="DIR", help="a CLIP tokenizer folder (default: a small built-in one)")
    p.add_argument("--gpu-suite", action="store_true",
                   help="the GPU cases: SD1.5 512² b4 UNet+TE and SDXL 1024² b1 UNet only, bf16, 48 steps")
    p.add_argument("--timeout", type=int, default=1800, help="seconds one run may take")
    p.add_argument("--json", default="output/bench.json")
    return p


def cases_from(args) -> list[Case]:
    if args.gpu_suite:
        return [Case(**c, rank=args.rank, alpha=args.alpha, steps=args.steps, warmup=args.warmup,
                     precision=args.precision) for c in GPU_SUITE]
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    for n in names:
        if n not in CASES:
            raise UserError(f"--cases: unknown case {n!r} (choose from {', '.join(CASES)})")
    blocks = tuple(b.strip() for b in args.blocks.split(",") if b.strip()) if args.blocks else None
    te = {"on": [True], "off": [False], "both": [True, False]}[args.train_text_encoder]
    if min(args.batch, args.rank, args.steps) < 1 or args.warmup < 0:
        raise UserError("--batch, --rank and --steps must be at least 1, --warmup at least 0")
    if args.steps < args.warmup + 2:
        raise UserError(f"--steps {args.steps}: need at least warmup + 2 = {args.warmup + 2} "
                        f"(one timed step and the FLOP-counted last one)")
    return [Case(n, args.resolution or DEFAULT_RESOLUTION[n], batch=args.batch, rank=args.rank, alpha=args.alpha,
                 steps=args.steps, warmup=args.warmup, train_text_encoder=t, blocks=blocks, precision=args.precision)
            for n in names for t in te]


def validate_ours(case: Case) -> None:
    """Our settings for ``case`` parse (one clear line if not) before any model is built."""
    from ..settings import Settings, SettingsError
    from .case import our_settings
    try:
        Settings.from_dict(our_settings(case, ".", None, "ours-bench"))
    except SettingsError as e:
        raise UserError(f"bench {case.label}: {e}") from None


def spawn(cmd: list[str], case: Case, result: Path, log: Path, env: dict, timeout: int) -> dict:
    """Run one instrumented process; its result JSON, or the tail of its log on failure."""
    env = dict(env, BENCH_RESULT=str(result), BENCH_WARMUP=str(case.warmup), BENCH_STEPS=str(case.steps),
               BENCH_T0=repr(time.time()))
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    out = json.loads(result.read_text()) if result.is_file() else {}
    if rc != 0 or out.get("steps_seen", 0) < case.steps:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{cmd[0]} … exited {rc} after {out.get('steps_seen', 0)} steps; log {log}:\n{tail}")
    return out


def finish(r: dict, case: Case, tool: str, peak_flops: float) -> dict:
    r.update(label=case.label, tool=tool, case=case.to_dict())
    if r.get("s_per_step"):
        r["steps_per_s"] = 1 / r["s_per_step"]
        r["samples_per_s"] = case.batch / r["s_per_step"]
        if r.get("flops_per_step"):
            r["achieved_flops"] = r["flops_per_step"] / r["s_per_step"]
            r["fraction_of_peak"] = r["achieved_flops"] / peak_flops
    r["matmul_peak_flops"] = peak_flops
    return r


def main(argv: Optional[list] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    import torch
    from ..atomic import atomic_path
    from ..engine import resolve_precision
    from . import fixtures, kohya
    from .peak import matmul_peak_flops
    from .report import ratio_table, ratios, table

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.gpu_suite:
        if device.type != "cuda":
            raise UserError("--gpu-suite needs a CUDA GPU (torch.cuda.is_available() is False here)")
        args.steps = args.steps if args.steps != 12 else 48
        args.warmup = args.warmup if args.warmup != 2 else 10
    cases = cases_from(args)
    for case in cases:
        validate_ours(case)
    sd_scripts = Path(args.kohya).resolve() if args.kohya else None
    if sd_scripts:
        for case in cases:
            kohya.check(case, sd_scripts)
        kenv = kohya.environment(args.kohya_pythonpath)
    if args.tokenizer and not (Path(args.tokenizer) / "vocab.json").is_file():
        raise UserError(f"--tokenizer {args.tokenizer}: no vocab.json there (a Hugging Face CLIP tokenizer folder)")
    rounds = args.rounds or (2 if sd_scripts else 1)

    dtype = resolve_precision(args.precision, device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, training dtype "
          f"{str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads; load {_load()}", flush=True)
    peak = matmul_peak_flops(device, dtype)
    print(f"matmul peak on {device.type} in {str(dtype).replace('torch.', '')}: {peak / 1e9:.1f} GFLOP/s", flush=True)

    results: list[dict] = []
    out = Path(args.json)

    def save() -> None:     # after every run, so a run cut short keeps what was measured
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps({"device": device.type, "dtype": str(dtype).replace("torch.", ""),
                                       "matmul_peak_flops": peak, "load": _load(), "runs": results,
                                       "ratios": ratios(results)}, indent=2))

    work_root = Path(tempfile.mkdtemp(prefix="shinkansen-bench-"))
    try:
        for case in cases:
            ckpt = str(fixtures.random_checkpoint(case.name)) if case.name != "tiny" else None
            tok = args.tokenizer or (str(fixtures.tokenizer_folder()) if ckpt else None)
            data = fixtures.image_folder(case.resolution, case.images)
            for rnd in range(1, rounds + 1):
                tools = ["ours", "kohya"] if sd_scripts else ["ours"]
                for tool in tools:
                    work = work_root / f"{case.name}-{case.resolution}-{int(case.train_text_encoder)}-{rnd}-{tool}"
                    work.mkdir(parents=True)
                    if tool == "ours":
                        spec = work / "spec.json"
                        spec.write_text(json.dumps({"case": case.to_dict(), "data": str(data), "checkpoint": ckpt,
                                                    "tokenizer": tok, "work": str(work)}))
                        cmd, env = [sys.executable, "-m", "trainer.bench.ours", str(spec)], _our_env()
                    else:
                        cache = kohya.tokenizer_cache(Path(tok), work / "tokenizers", case)
                        cmd = [sys.executable, str(Path(__file__).with_name("instrument.py")),
                               *kohya.command(case, sd_scripts, Path(ckpt), data, cache, work / "out",
                                              str(dtype).replace("torch.", ""))]
                        env = kenv
                    print(f"[{case.label}] round {rnd}: {tool} …", end=" ", flush=True)
                    r = finish(spawn(cmd, case, work / "result.json", work / "log.txt", env, args.timeout),
                               case, tool, peak)
                    r["round"] = rnd
                    r.setdefault("dtype", str(dtype).replace("torch.", ""))    # kohya: its mixed precision
                    results.append(r)
                    save()
                    print(f"{r['s_per_step']:.3f} s/step, first step {r['first_step_s']:.1f} s, "
                          f"peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    except RuntimeError as e:       # the work folder stays for its logs
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    shutil.rmtree(work_root, ignore_errors=True)

    rows = ratios(results)
    save()
    print()
    print(table(results))
    if rows:
        print()
        print(ratio_table(rows))
    print(f"\nload {_load()}; saved: {out}")
    return 0


def _our_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                             if p]])
    return env


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
