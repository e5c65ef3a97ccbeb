"""Tiny captioning models of the real formats, built here (nothing is downloaded).

* ``write_wd14``: an ONNX graph with the SmilingWolf taggers' signature (input ``input_1:0``, NHWC float32
  batch×448×448×3 BGR 0..255; output ``predictions_sigmoid``, one probability per ``selected_tags.csv`` row)
  and that CSV with its real columns. The probabilities are a linear function of the centre pixel's colour,
  so a solid-colour image gets exactly the probabilities of :data:`RED` / :data:`BLUE` (dyadic numbers,
  exact in float32), which lets the thresholds be tested at their boundaries.
* ``write_blip`` / ``write_florence2``: random tiny configurations saved with ``save_pretrained``, with
  their processors and tokenizers, loadable by transformers' own classes.
"""
from __future__ import annotations

import json
from pathlib import Path

# name, category (9 rating, 0 general, 4 character), probability for a pure red / pure blue image
TAGS = [
    ("general", 9, 0.25, 0.75), ("sensitive", 9, 0.5, 0.125), ("questionable", 9, 0.125, 0.0),
    ("explicit", 9, 0.0, 0.0),
    ("red_theme", 0, 0.875, 0.0), ("circle", 0, 0.625, 0.625), ("^_^", 0, 0.5, 0.0),
    ("no_humans", 0, 0.375, 0.75), ("simple_background", 0, 0.25, 0.25), ("blue_theme", 0, 0.0, 0.875),
    ("hatsune_miku", 4, 0.75, 0.125), ("kirby_(series)", 4, 0.5, 0.9375),
]
RED = {name: r for name, _, r, _ in TAGS}
BLUE = {name: b for name, _, _, b in TAGS}
SIZE = 448


def write_selected_tags(path: Path) -> None:
    rows = ["tag_id,name,category,count"] + [f"{1000 + i},{n},{c},{5000 - i}" for i, (n, c, _, _) in enumerate(TAGS)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def write_wd14(folder: Path) -> Path:
    """``model.onnx`` + ``selected_tags.csv`` in ``folder``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    folder.mkdir(parents=True, exist_ok=True)
    n = len(TAGS)
    weights = np.zeros((3, n), np.float32)            # rows: B, G, R (the model sees BGR)
    for j, (_, _, red, blue) in enumerate(TAGS):
        weights[2, j], weights[0, j] = red, blue
    c = SIZE // 2
    inits = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
             (("starts", [c, c]), ("ends", [c + 1, c + 1]), ("axes", [1, 2]), ("shape", [-1, 3]))]
    inits += [numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
              numpy_helper.from_array(weights, "weights"),
              numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
              numpy_helper.from_array(np.array(1.0, np.float32), "hi")]
    nodes = [
        helper.make_node("Slice", ["input_1:0", "starts", "ends", "axes"], ["centre"]),   # N×1×1×3
        helper.make_node("Reshape", ["centre", "shape"], ["bgr"]),                          # N×3
        helper.make_node("Div", ["bgr", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weights"], ["logits"]),
        helper.make_node("Clip", ["logits", "lo", "hi"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    write_selected_tags(folder / "selected_tags.csv")
    return folder


def write_blip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    folder.mkdir(parents=True, exist_ok=True)
    words = ("[PAD] [UNK] [CLS] [SEP] [MASK] [DEC] a red blue circle square triangle on black white "
             "background picture of the small large").split()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(seed)
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=5, pad_token_id=0, sep_token_id=3,
                eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)) \
        .save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer) \
        .save_pretrained(folder)
    return folder


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/BART vocabularies)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    out, extra = {b: b for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], extra = 256 + extra, extra + 1
    return [chr(out[b]) for b in range(256)]


def write_florence2(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, \
        Florence2Processor
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {s: i for i, s in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + _byte_symbols() + ["<mask>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = BartTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              extra_special_tokens={"image_token": "<image>"})
    # 64×64 input, strides 4·2·2·2 → 2×2 positions + 1 temporal token = 5 image tokens
    images = CLIPImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64},
                                do_center_crop=False)
    images.image_seq_length = 5
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(seed)
    config = Florence2Config(
        text_config=dict(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         decoder_start_token_id=2, forced_bos_token_id=0),
        vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[8, 16, 16, 32], num_heads=[1, 1, 1, 2],
                           num_groups=[1, 1, 1, 2], window_size=2, projection_dim=32, drop_path_rate=0.0),
        image_token_id=tokenizer.image_token_id)
    Florence2ForConditionalGeneration(config).save_pretrained(folder)
    return folder
