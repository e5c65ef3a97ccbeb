"""torch.distributed glue (SPEC §14): process group, batch sharding, rank-0 gates, stopping together.

``torchrun --nproc_per_node N -m trainer train JOB.json`` starts N copies of the ordinary CLI; torchrun
sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and the rendezvous, and :meth:`Dist.from_env` joins the group
(gloo on CPU, NCCL on CUDA with one device per local rank). Without torchrun the world is one process and
every method here is the identity: a single-process run takes none of these paths.

Why the batch is sharded this way: every rank draws the **global** batch (sampler indices, posterior
noise, diffusion noise, timesteps, caption shuffles) from the job-seeded generators, exactly as one process
with batch ``W·b`` would, and keeps its own slice of it (:meth:`Dist.shard`). Gradients are then averaged by
hand, weighted by each rank's share of the batch, so ``W`` ranks × batch ``b`` take the very step one rank
× batch ``W·b`` takes (up to float summation order). Drawing ``W`` times the noise costs a few
``randn`` calls per step, nothing beside a UNet forward. The per-rank seed (``seed + 1000003·rank``) goes
to torch's global generator, which only draws that are not part of the batch use (e.g. dropout).

The LoRA parameters are all-reduced by hand rather than through ``DistributedDataParallel``: the networks
are patched into the frozen model's modules, so there is no one ``nn.Module`` whose ``forward`` DDP could
wrap; one flat all-reduce of the trainable gradients per optimizer step is what DDP would do.

Stopping together: before each step the ranks agree on a Stop / Stop & Save request from any rank, after
the backward on a NaN or an exception on any rank (:meth:`agree_stop`, :meth:`agree_step`), so they all
leave the loop at the same step and nobody waits in a collective for a rank that has gone. A rank that
dies outright (killed, segfault) is torchrun's to notice: it ends the other workers and exits non-zero.
The group's timeout (``SHINKANSEN_DIST_TIMEOUT_S``, default 1800 s) bounds a wait for a rank that hangs.
"""
from __future__ import annotations

import datetime as _dt
import os
from typing import Optional, Sequence

import torch

from .errors import UserError

# Modes whose batches are sharded by rank. The others would train the same batch on every rank.
SHARDED_MODES = ("LoRA", "iLECO")
RANK_SEED_STRIDE = 1_000_003
# Test-only fault injection (never set by users): "KIND:RANK:STEP", KIND nan | error | exit.
FAULT_ENV = "SHINKANSEN_TEST_FAULT"


def env_world_size() -> int:
    """The world torchrun started (1 without torchrun), readable before the group exists."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def under_torchrun() -> bool:
    """Started by torchrun (even with one process: ``--nproc_per_node 1`` still goes through the group)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def global_batch(batch_size: int) -> int:
    """Samples one optimizer micro-step takes across all ranks: the per-rank batch × the world size."""
    return int(batch_size) * env_world_size()


def check_mode(mode: str, world_size: Optional[int] = None) -> None:
    world = env_world_size() if world_size is None else world_size
    if world > 1 and mode not in SHARDED_MODES:
        raise UserError(f"processes: data-parallel training supports {' and '.join(SHARDED_MODES)}; "
                        f"run {mode} in one process (processes 1, without torchrun)")


class Dist:
    """One run's place in the process group; ``world_size`` 1 = a plain single-process run."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, owns_group: bool = False,
                 active: Optional[bool] = None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.owns_group = owns_group
        self.active = world_size > 1 if active is None else active   # in a process group (torchrun)
        self._weight = 1.0
        self._fault = _parse_fault(os.environ.get(FAULT_ENV, "")) if self.active else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: Optional[torch.device] = None) -> "Dist":
        """Join the group torchrun describes in the environment (no-op without it)."""
        if not under_torchrun():
            return cls()
        import torch.distributed as td
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if td.is_initialized():
            return cls(td.get_rank(), td.get_world_size(), local, active=True)
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local)
        timeout = _dt.timedelta(seconds=float(os.environ.get("SHINKANSEN_DIST_TIMEOUT_S", "1800")))
        kwargs = {"device_id": torch.device("cuda", local)} if cuda else {}
        td.init_process_group("nccl" if cuda else "gloo", timeout=timeout, **kwargs)
        return cls(td.get_rank(), td.get_world_size(), local, owns_group=True, active=True)

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` for CUDA, the given one otherwise."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as td
            if td.is_initialized():
                td.destroy_process_group()
            self.owns_group = False

    # ------------------------------------------------------------------ the batch
    def shard(self, n: int) -> slice:
        """This rank's part of a global batch of ``n`` samples (contiguous, sizes differing by at most one).

        Records the rank's share so :meth:`take_weight` can scale its loss: with a share of ``n_r`` samples
        the loss (a batch mean) is multiplied by ``W·n_r/n``, and the average of the ranks' gradients is then
        the gradient of the global batch mean. A rank left without a sample takes sample 0 at weight 0 (it
        must still join the gradient all-reduce).
        """
        if not self.active:
            return slice(0, n)
        base, extra = divmod(int(n), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        size = base + (1 if self.rank < extra else 0)
        if size == 0:
            self._weight = 0.0
            return slice(0, 1)
        self._weight = self.world_size * size / n
        return slice(start, start + size)

    def take_weight(self) -> float:
        """The loss weight of the last :meth:`shard` (1 when the mode did not shard), then reset."""
        w, self._weight = self._weight, 1.0
        return w

    def seed_rank(self, seed: int) -> None:
        """Seed torch's global generator per rank (draws that are not part of the batch, e.g. dropout)."""
        if self.active:
            torch.manual_seed((int(seed) + RANK_SEED_STRIDE * self.rank) % (1 << 63))

    # ------------------------------------------------------------------ collectives
    def agree_stop(self, mode: Optional[str]) -> Optional[str]:
        """The stop request of the whole world: "stop" (discard) from any rank wins over "save"."""
        if not self.active:
            return mode
        import torch.distributed as td
        flags = torch.tensor([mode == "save", mode == "stop"], dtype=torch.float32, device=self._comm_device())
        td.all_reduce(flags, op=td.ReduceOp.MAX)
        return "stop" if flags[1] > 0 else "save" if flags[0] > 0 else None

    def agree_step(self, code: int, loss: float) -> tuple[list[int], float]:
        """After the backward: every rank's code (0 ok, 1 non-finite loss, 2 exception) and the summed loss
        contributions (each rank passes its weighted share, so the sum is the global batch's loss)."""
        if not self.active:
            return [code], loss
        import torch.distributed as td
        v = torch.zeros(self.world_size + 1, dtype=torch.float64, device=self._comm_device())
        v[self.rank] = code
        v[-1] = loss if code == 0 else 0.0
        td.all_reduce(v)
        return [int(c) for c in v[:-1].tolist()], float(v[-1])

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (pickled), e.g. error messages and per-rank RNG states."""
        if not self.active:
            return [obj]
        import torch.distributed as td
        out: list = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Average the gradients of ``params`` over the ranks in one flat buffer (what DDP would do).

        Parameters without a gradient on this rank have none on any (same graph on every rank) and stay so.
        """
        if not self.active:
            return
        import torch.distributed as td
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        td.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def _comm_device(self) -> torch.device:
        import torch.distributed as td
        return torch.device("cuda", self.local_rank) if td.get_backend() == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ test-only fault injection
    def fault(self, step: int) -> Optional[str]:
        """The fault ``SHINKANSEN_TEST_FAULT`` injects on this rank at 1-based optimizer step ``step``."""
        if self._fault and self._fault[1] == self.rank and self._fault[2] == step:
            return self._fault[0]
        return None


def _parse_fault(text: str) -> Optional[tuple[str, int, int]]:
    if not text:
        return None
    kind, rank, step = text.split(":")
    if kind not in ("nan", "error", "exit"):
        raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r}")
    return kind, int(rank), int(step)
