"""Faster and lighter training paths (issue 17): each is equal to the plain path, and lighter where it says so."""
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from trainer.models import checkpoint_io as io


def test_upcast_while_loading_equals_upcast_after(tmp_path):
    p = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(0)
    src = {"w": torch.randn(5, 7, generator=g).half(), "b": torch.randn(3, generator=g).to(torch.bfloat16),
           "f": torch.randn(2, 2, generator=g), "i": torch.arange(4)}
    save_file(src, str(p))
    plain = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in io.load_safetensors(p).items()}
    fast = io.load_safetensors(p, dtype=torch.float32)
    assert set(fast) == set(plain)
    for k in plain:
        assert fast[k].dtype == plain[k].dtype and torch.equal(fast[k], plain[k]), k   # bit-exact
    assert set(io.load_safetensors(p, keys=["w"], dtype=torch.float32)) == {"w"}


def test_upcast_while_loading_never_holds_the_file_and_its_copy(tmp_path):
    """Peak RSS of an fp16 → fp32 load: the fp32 copy (256 MiB) plus little, not also the 128 MiB file."""
    p = tmp_path / "half.safetensors"
    save_file({f"t{i}": torch.full((2 * 2**20,), float(i), dtype=torch.float16) for i in range(32)}, str(p))
    code = textwrap.dedent(f"""
        import torch
        from trainer.models.checkpoint_io import load_safetensors
        def kib(field):
            return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
        before = kib("VmRSS:")
        sd = load_safetensors({str(p)!r}, dtype=torch.float32)
        assert sd["t3"].dtype == torch.float32 and float(sd["t3"][0]) == 3.0
        print((kib("VmHWM:") - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.split()[-1])
    assert grew < 256 + 48, f"loading grew RSS by {grew} MiB (fp32 copy 256 MiB, fp16 file 128 MiB)"
