"""The trainable network: adapters on the selected layers, switched by a multiplier, added by hooks.

Why forward hooks: the base layers keep their own ``forward`` and weights (bit-identical, frozen,
shared with the WebUI), several networks can sit on the same layers and simply add up (Difference
pass 2 = frozen copier at weight 1 + trained LoRA, exactly how A1111 sums two LoRAs), and ``remove()``
restores every layer by dropping hook handles. Multiplier 0 skips the hook, so "off" is bit-exact.

Don't change a multiplier between a forward and its backward when gradient checkpointing is on (the
recomputation would see the new value).
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError
from . import blocks as B
from . import modules as M
from .targets import BASE, Target, block_counts, groups_for, name_table, normalize_blocks, \
    normalize_element, select_targets

log = logging.getLogger(__name__)

_APPLIED: "weakref.WeakSet[LoRANetwork]" = weakref.WeakSet()


@dataclass
class NetworkSpec:
    """What to build. ``conv_rank``/``conv_alpha`` 0 = use ``rank``/``alpha`` (3×3 convs only);
    ``alpha`` 0 = rank (scale 1, kohya's rule); ``blocks`` None = BASE and every UNet block."""
    network_type: str = "lierla"          # lierla | c3lier | loha | lokr
    rank: int = 16
    alpha: float = 8.0
    conv_rank: int = 0
    conv_alpha: float = 0.0
    dora: bool = False
    blocks: Optional[Sequence[str]] = None
    element: str = "Full"
    seed: Optional[int] = None            # initialisation seed (None: the global RNG)
    # kohya's per-slot lists (see .blocks): rank and alpha of Linear/1x1 modules, UNet LR multiplier
    block_dims: Optional[Sequence[int]] = None
    block_alphas: Optional[Sequence[float]] = None
    block_lr_weight: Optional[Sequence[float]] = None

    def rank_alpha(self, target: Target) -> tuple[int, float]:
        if target.kind == "conv":
            rank = int(self.conv_rank or self.rank)
            return rank, float(self.conv_alpha or self.alpha or rank)
        return int(self.rank), float(self.alpha or self.rank)

    def slot_rank_alpha(self, target: Target, slot: Optional[int]) -> tuple[int, float]:
        """:meth:`rank_alpha` with ``block_dims``/``block_alphas`` applied to a UNet Linear/1x1 module in
        kohya slot ``slot`` (3x3 convs and the text encoder keep the network's values, as in kohya)."""
        rank, alpha = self.rank_alpha(target)
        if slot is None or target.kind == "conv":
            return rank, alpha
        if self.block_dims is not None:
            rank = int(self.block_dims[slot])
            alpha = float(self.alpha or rank)
        if self.block_alphas is not None:
            alpha = float(self.block_alphas[slot] or rank)
        return rank, alpha

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks) if self.blocks is not None else None
        for k in ("block_dims", "block_alphas", "block_lr_weight"):
            if d[k] is None:
                del d[k]          # absent unless used: files of runs without them stay as they were
            else:
                d[k] = list(d[k])
        return d


def _parts(model: Any) -> tuple[nn.Module, list, str, str]:
    """(unet, text_encoders, family, prediction_type) of a ModelBundle or anything shaped like one."""
    family = getattr(model, "family", None) or getattr(getattr(model, "config", None), "family", None)
    if family is None:
        raise TypeError("the model needs a family (sd1, sd2, sdxl)")
    pred = getattr(model, "prediction_type", None) or "epsilon"
    return model.unet, list(getattr(model, "text_encoders", []) or []), family, pred


class LoRANetwork(nn.Module):
    """Adapters (lycoris modules) keyed by kohya name, with a multiplier and hooks on a model.

    Build with :func:`create_network` (from a spec) or :func:`network_from_state_dict` (from a file).
    """

    def __init__(self, spec: NetworkSpec, targets: Sequence[Target], adapters: Mapping[str, nn.Module],
                 model: Any) -> None:
        super().__init__()
        self.spec = spec
        unet, tes, self.family, self.prediction_type = _parts(model)
        self._model = (unet, tuple(tes))   # a tuple: the model's layers must not become submodules
        self.targets: dict[str, Target] = {t.name: t for t in targets}
        self.adapters = nn.ModuleDict(dict(adapters))
        self.multiplier: float = 1.0
        self._handles: list = []
        self.counts = block_counts(targets, self.unet)
        self.slots: dict[str, int] = {t.name: B.slot_of(t.path, self.family, self.unet)
                                      for t in targets if t.part == "unet"}

    # ------------------------------------------------------------------ facts
    @property
    def unet(self) -> nn.Module:
        return self._model[0]

    @property
    def text_encoders(self) -> list:
        return list(self._model[1])

    @property
    def algo(self) -> str:
        return M.ALGO_OF_TYPE[self.spec.network_type]

    @property
    def applied(self) -> bool:
        return bool(self._handles)

    def names(self) -> list[str]:
        return list(self.targets)

    def te_count(self) -> int:
        return sum(t.part == "te" for t in self.targets.values())

    def unet_count(self) -> int:
        return sum(t.part == "unet" for t in self.targets.values())

    def describe(self) -> str:
        s = self.spec
        kind = s.network_type + (" + DoRA" if s.dora else "")
        blocks = ", ".join(f"{b} {n}" for b, n in self.counts.items())
        ranks = "; ranks per block: " + ", ".join(f"{b} {'/'.join(map(str, r))}"
                                                   for b, r in self.block_ranks().items()) \
            if s.block_dims is not None else ""
        return (f"{kind} rank {s.rank} alpha {s.alpha:g}: {len(self.targets)} modules "
                f"(text encoder {self.te_count()}, UNet {self.unet_count()}); per block: {blocks}{ranks}")

    def block_ranks(self) -> dict[str, list[int]]:
        """The distinct module ranks of each block, in block order."""
        out: dict[str, set] = {}
        for name, t in self.targets.items():
            out.setdefault(t.block, set()).add(M.rank_of(self.adapters[name]))
        return {b: sorted(out[b], key=str) for b in self.counts if b in out}

    def lr_weight(self, name: str) -> float:
        """``block_lr_weight`` of module ``name`` (1 for the text encoder and when unset)."""
        w = self.spec.block_lr_weight
        slot = self.slots.get(name)
        return 1.0 if w is None or slot is None else float(w[slot])

    # ------------------------------------------------------------------ hooks
    def apply_to(self, model: Any = None) -> "LoRANetwork":
        """Hook every target layer (of ``model`` if given: same architecture, matched by path)."""
        if self.applied:
            raise RuntimeError("network already applied; remove() it first")
        if model is not None and model.unet is not self.unet:
            self._rebind(model)
        for name, target in self.targets.items():
            adapter = self.adapters[name]
            self._handles.append(target.module.register_forward_hook(self._hook(adapter, target.module)))
        _APPLIED.add(self)
        return self

    def remove(self) -> None:
        """Drop every hook: the layers are exactly as before ``apply_to``."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        _APPLIED.discard(self)

    def _hook(self, adapter: nn.Module, org: nn.Module):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            k = self.multiplier
            if k == 0:
                return None
            result = output + M.delta_output(adapter, org, args[0], k).to(output.dtype)
            if result.stride() != output.stride():
                # Keep the layer's own output layout (size-1 dims make channels-last ambiguous): later
                # kernels then run exactly as without the network, so a zero adapter changes nothing.
                result = torch.empty_like(output).copy_(result)
            return result
        return hook

    def _rebind(self, model: Any) -> None:
        unet, tes, family, _ = _parts(model)
        if family != self.family:
            raise UserError(f"this network was made for {self.family}, the model is {family}")
        new: dict[str, Target] = {}
        for name, t in self.targets.items():
            root = unet if t.part == "unet" else tes[t.encoder]
            module = root.get_submodule(t.path)
            if module.weight.shape != t.module.weight.shape:
                raise UserError(f"{name}: layer shape {tuple(module.weight.shape)} differs from the network's "
                                f"{tuple(t.module.weight.shape)}")
            new[name] = replace(t, module=module)
            self.adapters[name].org_module = [module]
        self.targets = new
        self._model = (unet, tuple(tes))

    # ------------------------------------------------------------------ multiplier
    @contextlib.contextmanager
    def at(self, multiplier: float) -> Iterator["LoRANetwork"]:
        """Temporarily run at ``multiplier`` (ADDifT's ±s)."""
        saved, self.multiplier = self.multiplier, float(multiplier)
        try:
            yield self
        finally:
            self.multiplier = saved

    def off(self) -> contextlib.AbstractContextManager:
        return self.at(0.0)

    # ------------------------------------------------------------------ training
    def trainable_parameters(self, unet_lr: Optional[float] = None,
                             te_lr: Optional[float] = None) -> list[dict]:
        """Optimizer param groups: ``unet`` and ``text_encoder`` (separate LR; None = optimizer default).

        With ``block_lr_weight``, UNet modules of a slot weighted w ≠ 1 form a group ``unet SLOT`` at
        ``unet_lr·w`` (kohya: one group per block); weight 0 freezes them (no gradient, in no group)."""
        groups = []
        names = B.slot_names(self.family, self.unet) if self.spec.block_lr_weight is not None else []
        for part, label, lr in (("unet", "unet", unet_lr), ("te", "text_encoder", te_lr)):
            by_group: dict[str, tuple[float, list]] = {}
            for name, t in self.targets.items():
                if t.part != part:
                    continue
                w = self.lr_weight(name)
                if w == 0:
                    self.adapters[name].requires_grad_(False)
                    continue
                key = label if w == 1 else f"{label} {names[self.slots[name]]}"
                by_group.setdefault(key, (w, []))[1].extend(p for p in self.adapters[name].parameters()
                                                           if p.requires_grad)
            for key, (w, params) in by_group.items():
                if params:
                    group: dict = {"params": params, "name": key}
                    if lr is not None:
                        group["lr"] = lr * w
                    groups.append(group)
        return groups

    def freeze(self) -> "LoRANetwork":
        """No gradients (a frozen copier in Difference pass 2)."""
        self.requires_grad_(False)
        return self

    # ------------------------------------------------------------------ tensors
    def kohya_state_dict(self, dtype: Optional[torch.dtype] = None, strength: float = 1.0) -> dict[str, torch.Tensor]:
        """File tensors (``NAME.lora_down.weight``…, ``NAME.alpha`` 0-d) with ``strength`` baked in,
        contiguous on CPU in ``dtype`` (alpha too, as kohya writes it)."""
        if strength != 1.0 and self.spec.dora:
            raise UserError("network_strength must be 1 with DoRA: the weight-decomposed effect is not linear in "
                            "the weights, so a strength cannot be baked into the file (set the weight when "
                            "loading the LoRA instead)")
        out: dict[str, torch.Tensor] = {}
        for name, adapter in self.adapters.items():
            tensors = M.bake_strength(M.algo_of(adapter), M.tensors_of(adapter), strength)
            for key, value in tensors.items():
                value = value.to("cpu") if value.device.type != "meta" else value
                out[f"{name}.{key}"] = value.to(dtype or value.dtype).contiguous()
        return out

    def load_kohya_state_dict(self, tensors: Mapping[str, torch.Tensor], strict: bool = True,
                              source: str = "file") -> None:
        """Load file tensors into the adapters (``network_resume``), checking names, keys and shapes.

        ``strict``: the file must cover every module and hold no unknown one. Errors are
        :class:`UserError` naming the first mismatches.
        """
        per_module = split_modules(tensors)
        unknown = [n for n in per_module if n not in self.adapters]
        missing = [n for n in self.adapters if n not in per_module]
        problems: list[str] = []
        if strict and unknown:
            problems.append(f"{len(unknown)} module(s) not in this network, e.g. {', '.join(unknown[:3])}")
        if strict and missing:
            problems.append(f"{len(missing)} module(s) of this network missing, e.g. {', '.join(missing[:3])}")
        for name, found in per_module.items():
            if name not in self.adapters:
                continue
            want = M.expected_keys(self.adapters[name]) - {"alpha"}
            have = set(found) - {"alpha"}
            if want != have:
                problems.append(f"{name}: file keys {sorted(have)} but the network needs {sorted(want)} "
                                f"(another network type or DoRA setting?)")
                continue
            try:
                alpha = M.load_tensors(name, self.adapters[name], found)
            except ValueError as e:
                problems.append(str(e))
                continue
            want_alpha = self.spec.rank_alpha(self.targets[name])[1]
            if alpha is not None and abs(alpha - want_alpha) > 1e-3 * max(1.0, abs(want_alpha)):
                log.info("%s: alpha %g from the %s (network setting %g)", name, alpha, source, want_alpha)
        if problems:
            raise UserError(f"{source} does not fit this network ({self.spec.network_type}, "
                            f"{'DoRA, ' if self.spec.dora else ''}{len(self.adapters)} modules): "
                            + "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))


def split_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"NAME.lora_up.weight": t}`` → ``{"NAME": {"lora_up.weight": t}}`` (split at the first dot, as A1111)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        out.setdefault(name, {})[suffix] = value
    return out


@contextlib.contextmanager
def networks_off(*networks: LoRANetwork) -> Iterator[None]:
    """Every given network (default: every applied network) at multiplier 0 inside the block:
    the frozen model's prediction, bit-identical to no network at all."""
    nets = list(networks) if networks else list(_APPLIED)
    saved = [(n, n.multiplier) for n in nets]
    for n in nets:
        n.multiplier = 0.0
    try:
        yield
    finally:
        for n, k in saved:
            n.multiplier = k


def applied_networks() -> list[LoRANetwork]:
    return list(_APPLIED)


@contextlib.contextmanager
def _seeded(seed: Optional[int]) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def create_network(model: Any, spec: NetworkSpec, dtype: torch.dtype = torch.float32) -> LoRANetwork:
    """A fresh network (not applied yet) for ``model`` (a ModelBundle, or anything with ``unet``,
    ``text_encoders``, ``family``). Logs the module count per block."""
    unet, tes, family, _ = _parts(model)
    groups_for(spec.network_type)
    spec = replace(spec, blocks=normalize_blocks(spec.blocks, unet), element=normalize_element(spec.element))
    if int(spec.rank) < 1:
        raise UserError(f"network_rank must be at least 1 (got {spec.rank})")
    targets = select_targets(unet, tes, family, spec.network_type, spec.blocks, spec.element)
    for name in ("block_dims", "block_alphas", "block_lr_weight"):
        B.check_count(getattr(spec, name), name, family, unet)
    per_slot = spec.block_dims is not None or spec.block_alphas is not None
    algo = M.ALGO_OF_TYPE[spec.network_type]
    adapters: dict[str, nn.Module] = {}
    kept: list[Target] = []
    with _seeded(spec.seed):
        for t in targets:
            slot = B.slot_of(t.path, family, unet) if per_slot and t.part == "unet" else None
            rank, alpha = spec.slot_rank_alpha(t, slot)
            if rank == 0:          # block_dims 0: no module in this block (kohya)
                continue
            adapters[t.name] = M.build(t.name, t.module, algo, rank, alpha, spec.dora, dtype=dtype)
            kept.append(t)
    if not any(t.part == "unet" for t in kept):
        raise UserError("block_dims: every selected UNet block has rank 0, so nothing would be trained; give "
                        "some block a rank above 0")
    targets = kept
    network = LoRANetwork(spec, targets, adapters, model)
    log.info("network %s", network.describe())
    if BASE in spec.blocks and not tes:
        log.warning("network_blocks: BASE selected but the model has no text encoder")
    return network


def network_from_state_dict(model: Any, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                            strict: bool = True, source: str = "file") -> LoRANetwork:
    """A network shaped by a LoRA file (any rank per module, LoRA/LoCon/LoHa/LoKr, DoRA), loaded with it:
    a copier for Difference pass 2, a LoRA to sample with. Names in either UNet style are accepted and
    the kohya name is kept. Unknown names: :class:`UserError` if ``strict``, else skipped with a warning."""
    unet, tes, family, _ = _parts(model)
    table = name_table(unet, tes, family)
    per_module = split_modules(tensors)
    unknown = [n for n in per_module if n not in table]
    if unknown:
        msg = f"{source}: {len(unknown)} module name(s) match no layer of this {family} model, e.g. {', '.join(unknown[:3])}"
        if strict:
            raise UserError(msg)
        log.warning("%s; skipped", msg)
    targets: list[Target] = []
    adapters: dict[str, nn.Module] = {}
    algos: Counter = Counter()
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    conv_alpha: dict[str, float] = {}
    dora = False
    for name, found in per_module.items():
        if name not in table:
            continue
        t = table[name]  # the canonical name is kept for saving
        if t.name in adapters:
            raise UserError(f"{source}: {name} and {t.name} are the same layer")
        try:
            adapter, algo = _adapter_from_tensors(t, found, dtype)
            file_alpha = M.load_tensors(t.name, adapter, found)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"{source}: module {name}: {e}") from None
        targets.append(t)
        adapters[t.name] = adapter
        algos[algo] += 1
        alpha = file_alpha or float(M.rank_of(adapter))
        if t.kind == "conv":
            conv_alpha[t.name] = alpha
        else:
            ranks[M.rank_of(adapter)] += 1
            alphas[alpha] += 1
        dora = dora or "dora_scale" in found
    if not targets:
        raise UserError(f"{source}: no LoRA module of this file matches the model")
    algo = algos.most_common(1)[0][0]
    has_conv = any(t.group == "conv" for t in targets)
    network_type = {"loha": "loha", "lokr": "lokr"}.get(algo, "c3lier" if has_conv else "lierla")
    rank = ranks.most_common(1)[0][0] if ranks else M.rank_of(next(iter(adapters.values())))
    if not alphas:
        alphas[float(rank)] += 1
    conv = Counter((M.rank_of(adapters[t.name]), conv_alpha[t.name]) for t in targets if t.kind == "conv")
    conv_rank, conv_alpha_ = conv.most_common(1)[0][0] if conv else (0, 0.0)
    spec = NetworkSpec(network_type=network_type, rank=rank, alpha=alphas.most_common(1)[0][0],
                       conv_rank=conv_rank, conv_alpha=conv_alpha_, dora=dora,
                       blocks=tuple(block_counts(targets, unet)), element="Full")
    network = LoRANetwork(spec, targets, adapters, model)
    log.info("loaded %s: %s", source, network.describe())
    return network


def _adapter_from_tensors(t: Target, found: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[nn.Module, str]:
    alpha = float(found["alpha"].float()) if "alpha" in found else 0.0
    dora_scale = found.get("dora_scale")
    if "lora_down.weight" in found:
        rank = found["lora_down.weight"].shape[0]
        adapter = M.build(t.name, t.module, "locon", rank, alpha, False, dtype=dtype,
                          use_tucker="lora_mid.weight" in found)
        algo = "locon"
    elif "hada_w1_a" in found:
        rank = found["hada_w1_b"].shape[0]
        adapter = M.build(t.name, t.module, "loha", rank, alpha, False, dtype=dtype, use_tucker="hada_t1" in found)
        algo = "loha"
    elif "lokr_w1" in found or "lokr_w1_a" in found:
        g = found.get
        with torch.no_grad(), torch.device("cpu"):
            adapter = M.LokrModule.make_module_from_state_dict(
                t.name, t.module, g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"), g("lokr_w2"), g("lokr_w2_a"),
                g("lokr_w2_b"), None, g("lokr_t2"), found.get("alpha", torch.tensor(0.0)), None)
        adapter = adapter.to(device=t.module.weight.device, dtype=dtype)
        algo = "lokr"
    else:
        raise ValueError(f"unsupported LoRA keys {sorted(found)}")
    if dora_scale is not None:
        M.enable_dora(adapter, dora_scale)
        adapter.to(dtype=dtype)
    return adapter, algo


def kohya_names(network: LoRANetwork) -> dict[str, Target]:
    """The network's name table: kohya name → target (our path, block, checkpoint weight)."""
    return dict(network.targets)
