"""The one step-end instrument both tools are timed by (ours and kohya's sd-scripts alike).

Why a global optimizer hook and not each tool's progress bar: ``torch.optim.Optimizer``'s
step post hook fires at the end of every optimizer step in any training script, so the same
code measures ours and kohya's without trusting either tool's own timing. On CUDA it
synchronizes first, so a step's end is when its kernels finished, not when they were queued.

It records: the wall time of each step end, start → first step (``BENCH_T0`` is the parent's
clock just before it spawned this process), peak RSS, peak CUDA memory (whole process and from
the end of step 1 on: the train-time peak), and the FLOPs of the last step (counted with
``torch.utils.flop_counter``; that step is then left out of the timing). At exit it writes one
JSON object to ``BENCH_RESULT``.

This file imports only the standard library and torch: it also runs as a plain script inside
kohya's environment, ``python instrument.py SCRIPT.py ARGS...``, which installs the hook and
runs the script as ``__main__``.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import statistics
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def peak_rss_gib() -> float:
    try:
        import resource
    except ImportError:     # Windows: no getrusage
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform != "darwin" else peak / 2**30


def summarize(ends: list[float], t0: float, warmup: int, counted_last: bool) -> dict:
    """Step times from step-end wall times: ``ends[i]`` is the end of step i+1, so step k lasted
    ``ends[k-1] - ends[k-2]``. The median leaves out steps 1..warmup (step 1 has no start) and the
    FLOP-counted last step."""
    out: dict = {"steps_seen": len(ends)}
    if not ends:
        return out
    out["first_step_s"] = ends[0] - t0
    durations = [b - a for a, b in zip(ends, ends[1:])]     # steps 2..n
    if counted_last:
        durations = durations[:-1]
    first = max(warmup, 1) + 1                                # first timed step (1-based)
    timed = durations[first - 2:] or durations[-1:]
    if timed:
        first = len(durations) - len(timed) + 2
        out.update(step_times=timed, timed_steps=[first, first + len(timed) - 1],
                   s_per_step=statistics.median(timed), mean_s_per_step=sum(timed) / len(timed))
    return out


class Instrument:
    def __init__(self, result: str | None, t0: float, warmup: int, total_steps: int, count_flops: bool = True):
        self.result, self.t0, self.warmup, self.total = result, t0, warmup, total_steps
        self.count_flops = count_flops and total_steps >= 2
        self.cuda = torch.cuda.is_available()
        self.ends: list[float] = []
        self.info: dict = {}
        self._counter = None
        self._handle = None

    def install(self) -> "Instrument":
        self._handle = register_optimizer_step_post_hook(self.hook)
        atexit.register(self.write)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def hook(self, optimizer, args, kwargs) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.ends.append(time.time())
        n = len(self.ends)
        if n == 1:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.info.update(trainable_params=sum(p.numel() for p in params),
                             trainable_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in params}),
                             optimizer=type(optimizer).__name__)
            if self.cuda:
                self.info["peak_cuda_load_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
        if self.count_flops and n == self.total - 1:          # count the last step's FLOPs
            from torch.utils.flop_counter import FlopCounterMode
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        elif self._counter is not None and n == self.total:
            self._counter.__exit__(None, None, None)
            self.info["flops_per_step"] = self._counter.get_total_flops()
            self._counter = None

    def summary(self) -> dict:
        out = dict(self.info)
        out.update(summarize(self.ends, self.t0, self.warmup, "flops_per_step" in self.info))
        out["peak_rss_gib"] = peak_rss_gib()
        if self.cuda:
            out["peak_cuda_train_gib"] = torch.cuda.max_memory_allocated() / 2**30   # since step 1
            out["peak_cuda_gib"] = max(out["peak_cuda_train_gib"], out.get("peak_cuda_load_gib", 0.0))
            out["device"] = torch.cuda.get_device_name()
        else:
            out["device"] = "cpu"
        out["threads"] = torch.get_num_threads()
        out["torch"] = torch.__version__
        out["end_s"] = time.time() - self.t0
        return out

    def write(self) -> None:
        if self._counter is not None:       # the run ended inside the counted step
            self._counter.__exit__(None, None, None)
            self._counter = None
        if not self.result:
            return
        tmp = f"{self.result}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.summary(), f)
        os.replace(tmp, self.result)
        self.result = None      # once


def from_env() -> Instrument:
    """The instrument configured by the parent bench process (``BENCH_*`` variables)."""
    return Instrument(os.environ.get("BENCH_RESULT"), float(os.environ.get("BENCH_T0", time.time())),
                      int(os.environ.get("BENCH_WARMUP", "2")), int(os.environ.get("BENCH_STEPS", "0")))


def run_script(path: str, argv: list[str]) -> None:
    """Run a training script as ``__main__`` with the instrument installed (kohya's scripts)."""
    import runpy
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]   # no shadowing by our modules
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    runpy.run_path(path, run_name="__main__")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))    # a timeout still writes the result
    from_env().install()
    run_script(sys.argv[1], sys.argv[2:])
