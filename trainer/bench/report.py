"""The bench table: one row per run, then ours ÷ kohya per case (medians over the interleaved rounds)."""
from __future__ import annotations

import math
import statistics


def _f(v, fmt: str, width: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}}"
    return f"{v:{width}{fmt}}"


def table(results: list[dict]) -> str:
    cuda = any(r.get("peak_cuda_train_gib") is not None for r in results)
    head = (f"{'case':22} {'tool':6} {'dtype':8} {'s/step':>7} {'steps/s':>7} {'samples/s':>9} {'1st step':>8} "
            f"{'peak RSS':>8}" + (f" {'CUDA train':>10} {'CUDA all':>8}" if cuda else "")
            + f" {'GFLOP/step':>10} {'of peak':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['label']:22} {r['tool']:6} {r.get('dtype') or '-':8} {_f(r.get('s_per_step'), '.3f', 7)} "
                     f"{_f(r.get('steps_per_s'), '.3f', 7)} {_f(r.get('samples_per_s'), '.3f', 9)} "
                     f"{_f(r.get('first_step_s'), '.1f', 7)}s {_f(r.get('peak_rss_gib'), '.2f', 6)}Gi"
                     + (f" {_f(r.get('peak_cuda_train_gib'), '.2f', 8)}Gi {_f(r.get('peak_cuda_gib'), '.2f', 6)}Gi"
                        if cuda else "")
                     + f" {_f((r.get('flops_per_step') or 0) / 1e9 or None, '.1f', 10)}"
                       f" {_f(r.get('fraction_of_peak'), '.3f', 7)}")
    return "\n".join(lines)


def _median(rs: list[dict], key: str):
    vals = [r[key] for r in rs if r.get(key) is not None and not math.isnan(r[key])]
    return statistics.median(vals) if vals else None


def ratios(results: list[dict]) -> list[dict]:
    """Per case with both tools: ours ÷ kohya (above 1 = ours more steps/s; below 1 = ours less memory/time)."""
    out = []
    for label in dict.fromkeys(r["label"] for r in results):
        ours = [r for r in results if r["label"] == label and r["tool"] == "ours"]
        kohya = [r for r in results if r["label"] == label and r["tool"] == "kohya"]
        if not ours or not kohya:
            continue
        row = {"label": label, "rounds": min(len(ours), len(kohya))}
        for key in ("steps_per_s", "samples_per_s", "peak_rss_gib", "peak_cuda_train_gib", "peak_cuda_gib",
                    "first_step_s", "fraction_of_peak"):
            a, b = _median(ours, key), _median(kohya, key)
            row[key] = a / b if a is not None and b else None
        out.append(row)
    return out


def ratio_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cuda = any(r.get("peak_cuda_train_gib") is not None for r in rows)
    head = (f"{'ours ÷ kohya':22} {'steps/s':>7} {'samples/s':>9} {'peak RSS':>8}"
            + (f" {'CUDA train':>10} {'CUDA all':>8}" if cuda else "") + f" {'1st step':>8} {'rounds':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:22} {_f(r['steps_per_s'], '.2f', 6)}× {_f(r['samples_per_s'], '.2f', 8)}× "
                     f"{_f(r['peak_rss_gib'], '.2f', 7)}×"
                     + (f" {_f(r['peak_cuda_train_gib'], '.2f', 9)}× {_f(r['peak_cuda_gib'], '.2f', 7)}×" if cuda else "")
                     + f" {_f(r['first_step_s'], '.2f', 7)}× {r['rounds']:>6}")
    return "\n".join(lines)
