"""``python -m trainer bench``: speed and memory of LoRA training, measured the way kohya's baseline was.

Each case runs in its own process (so peak RSS is that case's alone) and reports:
optimizer steps/s and samples/s (median step time over the steps after warm-up),
time from process start to the end of the first step, peak RSS (and peak CUDA memory),
the FLOPs of one training step (counted with ``torch.utils.flop_counter``) and the achieved
FLOP/s as a fraction of the fp32 matmul peak (a 2048² ``torch.mm``) measured in the same
process just before training. Cases: ``tiny`` (the embedded model) and ``sd15`` (random
weights in the SD1.5 layout, written once to a cached fp16 checkpoint and loaded by mmap).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

CASES = ("tiny", "sd15")
CACHE = Path(os.environ.get("SHINKANSEN_CACHE", Path.home() / ".cache" / "shinkansen"))


def matmul_peak_gflops(n: int = 2048, repeats: int = 7) -> float:
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def random_sd15_checkpoint() -> tuple[Path, Path]:
    """A random-weight SD1.5-layout checkpoint (fp16) and a tokenizer folder, cached across runs."""
    import torch
    from .models.checkpoint_io import save_safetensors_atomic
    from .models.configs import builtin_config
    from .models.text_encoders import build_text_encoder
    from .models.tiny import write_tokenizer, TINY_WORDS
    from .models.unet import UNetModel
    from .models.vae import AutoencoderKL
    folder = CACHE / "bench"
    path, tok = folder / "sd15-random.safetensors", folder / "tokenizer"
    if path.is_file() and (tok / "vocab.json").is_file():
        return path, tok
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tok, TINY_WORDS)
    cfg = builtin_config("sd15")
    state = {}
    gen = torch.Generator().manual_seed(0)
    for prefix, module in (("model.diffusion_model.", UNetModel(cfg.unet)),
                           ("first_stage_model.", AutoencoderKL(**cfg.vae.kwargs()))):
        for k, v in module.state_dict().items():
            state[prefix + k] = v.to(torch.float16)
        del module
    te = build_text_encoder("sd1", cfg.text_encoders[0].config)
    state.update({k: (v.to(torch.float16) if v.is_floating_point() else v)
                  for k, v in te.checkpoint_state_dict().items()})
    save_safetensors_atomic(state, path)
    return path, tok


def run_case(case: str, steps: int, warmup: int, resolution: int, batch: int, rank: int, alpha: float,
             spawn_time: float) -> dict:
    """Runs inside the case's own process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .world import toy
    from .engine import Run
    from .events import EventBus, StepEvent, peak_memory_mb
    from .runner import run_job
    from .settings import Settings

    peak = matmul_peak_gflops()
    work = Path(tempfile.mkdtemp(prefix="shinkansen-bench-"))
    size = resolution
    toy.make_dataset(work / "data", 8, seed=1, image_size=size)
    model_args = {}
    tokenizer = None
    if case == "sd15":
        ckpt, tokenizer = random_sd15_checkpoint()
        model_args["model_checkpoint"] = str(ckpt)
    settings = Settings.from_dict({
        "mode": "LoRA", "lora_data_directory": str(work / "data"), "image_size": str(size),
        "image_buckets_step": 64, "image_min_length": 64, "train_iterations": steps, "train_batch_size": batch,
        "train_learning_rate": 1e-4, "train_optimizer": "AdamW", "train_lr_scheduler": "constant",
        "network_rank": rank, "network_alpha": alpha, "train_seed": 1, "save_lora_name": f"bench-{case}",
        "train_model_precision": "fp32", "train_VAE_precision": "fp32", "logging_save_csv": False, **model_args})
    ends: list[float] = []
    first = {}

    def sink(e):
        if isinstance(e, StepEvent):
            ends.append(time.perf_counter())
            if e.step == 1:
                first["t"] = time.time()

    flops = {}
    original_train = Run.train

    def counting_train(self, loss_fn, network, *a, **kw):
        def wrapped(step):
            if step == steps - 1 and "n" not in flops:      # the last step: counted, not timed
                with FlopCounterMode(display=False) as fc:
                    loss_fn(step).backward()
                flops["n"] = fc.get_total_flops()
                for p in network.parameters():      # the counted pass must not train
                    p.grad = None
            return loss_fn(step)
        return original_train(self, wrapped, network, *a, **kw)

    if tokenizer is not None:   # random weights carry no tokenizer: use a small one
        import trainer.models.loader as loader
        real = loader.load_tokenizer
        loader.load_tokenizer = lambda config, override=None: real(config, str(tokenizer))
    Run.train = counting_train
    try:
        run_job(settings, lora_dir=work / "out", events=EventBus([sink]), log_dir=work / "logs",
                json_dir=work / "json")
    finally:
        Run.train = original_train
    step_times = [b - a for a, b in zip(ends, ends[1:])][warmup:-1] or [ends[-1] - ends[0]]
    median = statistics.median(step_times)
    fl = flops.get("n", 0)
    return {"case": case, "resolution": size, "batch": batch, "rank": rank, "steps": steps,
            "s_per_step": median, "steps_per_s": 1 / median, "samples_per_s": batch / median,
            "first_step_s": first.get("t", float("nan")) - spawn_time,
            "peak_rss_gib": peak_memory_mb("cpu") / 1024,
            "peak_cuda_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None,
            "gflop_per_step": fl / 1e9, "achieved_gflops": fl / 1e9 / median,
            "matmul_peak_gflops": peak, "fraction_of_peak": (fl / 1e9 / median) / peak if peak else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def table(results: list[dict]) -> str:
    head = f"{'case':6} {'res':>4} {'s/step':>7} {'steps/s':>8} {'first step':>10} {'peak RSS':>9} " \
           f"{'GFLOP/step':>10} {'GFLOP/s':>8} {'mm peak':>8} {'of peak':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['case']:6} {r['resolution']:>4} {r['s_per_step']:>7.3f} {r['steps_per_s']:>8.2f} "
                     f"{r['first_step_s']:>9.1f}s {r['peak_rss_gib']:>7.2f}Gi {r['gflop_per_step']:>10.1f} "
                     f"{r['achieved_gflops']:>8.1f} {r['matmul_peak_gflops']:>8.1f} {r['fraction_of_peak']:>7.2f}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="tiny,sd15", help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--resolution", type=int, default=256, help="for sd15 (tiny always runs at 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=8)
    p.add_argument("--json", default="output/bench.json")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--spawn-time", type=float, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:   # child process
        res = 64 if args.case == "tiny" else args.resolution
        out = run_case(args.case, args.steps, args.warmup, res, args.batch, args.rank, args.alpha, args.spawn_time)
        Path(args.result).write_text(json.dumps(out))
        return 0
    results = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case not in CASES:
            print(f"error: unknown case {case!r} ({', '.join(CASES)})", file=sys.stderr)
            return 2
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result_file = f.name
        if case == "sd15":
            random_sd15_checkpoint()      # build the cached file outside the timed process
        spawn = time.time()
        r = subprocess.run([sys.executable, "-m", "trainer", "bench", "--case", case, "--steps", str(args.steps),
                            "--warmup", str(args.warmup), "--resolution", str(args.resolution), "--batch",
                            str(args.batch), "--rank", str(args.rank), "--alpha", str(args.alpha),
                            "--spawn-time", str(spawn), "--result", result_file])
        if r.returncode != 0:
            print(f"error: bench case {case} failed", file=sys.stderr)
            return 1
        results.append(json.loads(Path(result_file).read_text()))
        os.unlink(result_file)
        print(table(results[-1:]).splitlines()[-1] if len(results) > 1 else table(results), flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print(f"saved: {out}")
    return 0
