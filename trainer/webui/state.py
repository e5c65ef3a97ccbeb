"""Leaving the WebUI's model as it was, and clean before we start.

Two jobs, both on plain objects handed in by ``trainer/webui/adapter.py`` (nothing here imports the
WebUI):

- :func:`reset_builtin_lora`: the built-in Lora extension merges a generation's LoRAs into
  the weights *in place* and keeps them merged until the next generation without them.
  Our bundle shares those tensors, so we put the CPU backups back first; otherwise the
  last generation's LoRA would be baked into what we train on.
- :class:`ModelSnapshot`: ``requires_grad``, ``train()``/``eval()``, devices and hooks of
  every WebUI module, recorded before a job and put back after it (finished, stopped or
  failed). Training runs on our own module objects, so normally nothing changed; the
  snapshot makes that a checked promise instead of an assumption.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _copy_backup(module: nn.Module) -> None:
    """A1111 1.10's ``network_restore_weights_from_backup``, for when the extension's module is absent."""
    weights = getattr(module, "network_weights_backup", None)
    bias = getattr(module, "network_bias_backup", None)
    if isinstance(module, nn.MultiheadAttention):
        if weights is not None:
            module.in_proj_weight.copy_(weights[0])
            module.out_proj.weight.copy_(weights[1])
        if bias is not None and module.out_proj.bias is not None:
            module.out_proj.bias.copy_(bias)
        return
    if weights is not None:
        module.weight.copy_(weights)
    if bias is not None and getattr(module, "bias", None) is not None:
        module.bias.copy_(bias)


@torch.no_grad()
def reset_builtin_lora(model: nn.Module, networks: Any = None) -> int:
    """Undo LoRAs merged in place by the built-in Lora extension; returns how many layers were restored.

    ``networks`` is the extension's top-level module (``sys.modules["networks"]``) or ``None``.
    ``loaded_networks`` is emptied so nothing re-merges before the next generation asks for it;
    the backups stay, as the extension expects (they are the original weights).
    """
    if networks is not None and hasattr(networks, "loaded_networks"):
        networks.loaded_networks.clear()
    restore = getattr(networks, "network_restore_weights_from_backup", None) or _copy_backup
    count = 0
    for module in model.modules():
        if getattr(module, "network_current_names", ()) not in ((), None):
            restore(module)
            module.network_current_names = ()
            count += 1
    return count


@dataclass
class ModelSnapshot:
    """What a training job must not change on the WebUI's modules (flags, devices, hooks)."""
    training: dict = field(default_factory=dict)        # module name -> bool
    requires_grad: dict = field(default_factory=dict)   # parameter name -> bool
    devices: dict = field(default_factory=dict)         # parameter/buffer name -> torch.device
    hooks: dict = field(default_factory=dict)           # module name -> {hook dict: set of handle ids}

    @classmethod
    def capture(cls, model: nn.Module) -> "ModelSnapshot":
        snap = cls()
        for name, module in model.named_modules():
            snap.training[name] = module.training
            snap.hooks[name] = {d: set(getattr(module, d, {}) or {}) for d in _HOOK_DICTS}
        for name, p in model.named_parameters(remove_duplicate=False):
            snap.requires_grad[name] = p.requires_grad
            snap.devices[name] = p.device
        for name, b in model.named_buffers(remove_duplicate=False):
            snap.devices[name] = b.device
        return snap

    def restore(self, model: nn.Module) -> list[str]:
        """Put flags, devices and hooks back; returns what had changed (empty when nothing had)."""
        changed: list[str] = []
        modules = dict(model.named_modules())
        for name, module in modules.items():
            if name in self.training and module.training != self.training[name]:
                module.training = self.training[name]   # this module only; children have their own entry
                changed.append(f"{name or 'model'}: training flag")
            for d, before in self.hooks.get(name, {}).items():
                hooks = getattr(module, d, None)
                for key in [k for k in (hooks or {}) if k not in before]:
                    del hooks[key]
                    changed.append(f"{name or 'model'}: {d[1:]} {key}")
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in self.requires_grad and p.requires_grad != self.requires_grad[name]:
                p.requires_grad_(self.requires_grad[name])
                changed.append(f"{name}: requires_grad")
            self._device_back(name, p, changed)
        for name, b in model.named_buffers(remove_duplicate=False):
            self._device_back(name, b, changed)
        return changed

    def _device_back(self, name: str, tensor: torch.Tensor, changed: list) -> None:
        want: Optional[torch.device] = self.devices.get(name)
        if want is not None and tensor.device != want:
            tensor.data = tensor.data.to(want)
            changed.append(f"{name}: device")
