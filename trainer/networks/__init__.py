"""LoRA family on lycoris-lora: target selection, multiplier, stacking, kohya-format files.

- :mod:`.targets`: which layers (network type, ``network_blocks``, ``network_element``) and their kohya names;
- :mod:`.modules`: lycoris glue (build, effect, tensors in and out, strength);
- :mod:`.network`: :class:`LoRANetwork` (hooks, multiplier, param groups, resume);
- :mod:`.file`: save/load, metadata, kohya's hashes.

Typical use::

    net = create_network(bundle, NetworkSpec("lierla", rank=4, alpha=1, blocks=[...]))
    net.apply_to(bundle)
    opt = torch.optim.AdamW(net.trainable_parameters(unet_lr=1e-4, te_lr=5e-5))
    with networks_off():          # frozen prediction
        ...
    save_lora(net, "out.safetensors", {"ss_output_name": "out"}, dtype="fp16", strength=1.0)
    net.remove()
"""
from .file import (build_metadata, file_model_hash, kohya_hashes, load_lora, lora_file_bytes, network_metadata,
                   read_metadata, resume_network, save_dtype, save_lora, write_file_atomic, write_safetensors)
from .network import (LoRANetwork, NetworkSpec, applied_networks, create_network, kohya_names,
                       network_from_state_dict, networks_off, split_modules)
from .targets import (BASE, ELEMENTS, NETWORK_TYPES, Target, diffusers_path, name_table, normalize_blocks,
                      normalize_element, select_targets, unet_block_ids)

__all__ = [
    "LoRANetwork", "NetworkSpec", "create_network", "network_from_state_dict", "networks_off", "applied_networks",
    "kohya_names", "split_modules", "save_lora", "load_lora", "resume_network", "read_metadata", "build_metadata",
    "network_metadata", "kohya_hashes", "file_model_hash", "save_dtype", "write_safetensors", "lora_file_bytes",
    "write_file_atomic", "Target",
    "name_table", "select_targets", "diffusers_path", "normalize_blocks", "normalize_element", "unet_block_ids",
    "BASE", "ELEMENTS", "NETWORK_TYPES",
]
