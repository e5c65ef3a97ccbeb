"""An SDXL-shaped WebUI model (sgm conditioner, hijack wrappers, open_clip attention) shared into our bundle.

Small golden text encoders (the reference ones of test_conditioning) in A1111's SDXL layout: our
bundle over them must condition exactly like a bundle built from the same weights directly, share
every tensor (OpenCLIP's fused q/k/v included, as views), and read what shapes cannot tell (heads,
activation, v-prediction, scale) from the model object.
"""
import torch
from torch import nn

from fake_webui import Container, EmbeddingsWithFixes
from reference import golden_state_dict, load_json, reference_dir
from trainer.models import text_encoders as te
from trainer.models.bundle import ModelBundle
from trainer.models.configs import ModelConfig, TextEncoderSpec, VAEConfig
from trainer.models.schedule import NoiseSchedule
from trainer.models.tokenizer import ClipTokenizer
from trainer.models.unet import UNetConfig, UNetModel
from trainer.models.vae import AutoencoderKL
from trainer.webui.model import bundle_from_webui, checkpoint_state


def _param_tree(state: dict) -> nn.Module:
    root = Container()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, Container())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    return root


def open_clip_model(weights: dict, heads: int) -> nn.Module:
    """open_clip's text tower as sgm's FrozenOpenCLIPEmbedder2 holds it (MHA attention, wrapped tokens)."""
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("transformer.resblocks."))
    model = _param_tree({k: v for k, v in weights.items()
                         if not k.startswith(("transformer.", "token_embedding."))})
    emb = nn.Embedding(*weights["token_embedding.weight"].shape)
    emb.weight = nn.Parameter(weights["token_embedding.weight"].clone(), requires_grad=False)
    model.token_embedding = EmbeddingsWithFixes(emb)
    blocks = nn.ModuleList()
    for i in range(layers):
        own = {k[len(f"transformer.resblocks.{i}."):]: v for k, v in weights.items()
               if k.startswith(f"transformer.resblocks.{i}.")}
        block = _param_tree({k: v for k, v in own.items() if not k.startswith("attn.")})
        width = own["attn.in_proj_weight"].shape[1]
        block.attn = nn.MultiheadAttention(width, heads)
        block.attn.load_state_dict({k[5:]: v for k, v in own.items() if k.startswith("attn.")})
        blocks.append(block)
    model.transformer = Container()
    model.transformer.resblocks = blocks
    return model


def test_sdxl_model_is_shared_and_conditions_like_its_weights():
    j = load_json("golden/clip_text.json")
    clip_cfg = te.load_text_config(j["clip_l"]["config"])
    clip_w = golden_state_dict(j["clip_l"]["weights"])
    o = j["openclip"]
    oc_w = {k[len("model."):]: v for k, v in golden_state_dict(o["weights"]).items()}
    tok = ClipTokenizer.from_folder(reference_dir() / "tokenizer")

    # the reference: a bundle built straight from the weights with the right configs
    e1 = te.load_text_encoder({te.ROLES["sdxl_te1"].prefix + k: v.clone() for k, v in clip_w.items()}, "sdxl_te1",
                              clip_cfg)
    oc_cfg = te.openclip_config(o["text_cfg"]["width"], o["text_cfg"]["layers"], o["text_cfg"]["heads"],
                                o["mlp_width"], o["embed_dim"])
    e2 = te.load_text_encoder({te.ROLES["sdxl_te2"].prefix + k: v.clone() for k, v in oc_w.items()}, "sdxl_te2",
                              oc_cfg)
    unet_cfg = UNetConfig(model_channels=32, num_head_channels=16, num_heads=-1, context_dim=128,
                          channel_mult=(1, 2), attention_resolutions=(2,), transformer_depth=(1, 2),
                          use_linear_in_transformer=True, adm_in_channels=64 + 6 * 256)
    vae_cfg = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2))
    torch.manual_seed(0)
    ref = ModelBundle(ModelConfig("sdxl", unet_cfg, vae_cfg,
                                  [TextEncoderSpec("sdxl_te1", clip_cfg), TextEncoderSpec("sdxl_te2", oc_cfg)],
                                  native_size=(1024, 1024)),
                      UNetModel(unet_cfg), AutoencoderKL(**vae_cfg.kwargs()), [e1, e2], tok,
                      NoiseSchedule()).requires_grad_(False).eval()

    # the WebUI's object: sgm DiffusionEngine with A1111's wrappers
    sd_model = Container()
    sd_model.model = Container()
    sd_model.model.diffusion_model = UNetModel(unet_cfg)
    sd_model.model.diffusion_model.load_state_dict(ref.unet.state_dict())
    sd_model.model.diffusion_model.num_heads, sd_model.model.diffusion_model.num_head_channels = -1, 16
    sd_model.first_stage_model = AutoencoderKL(**vae_cfg.kwargs())
    sd_model.first_stage_model.load_state_dict(ref.vae.state_dict())
    clip = te.build_text_encoder("sdxl_te1", clip_cfg)
    clip.load_encoder_state_dict({k: v.clone() for k, v in e1.state_dict().items()}, assign=True)
    first = Container()
    first.wrapped = Container()
    first.wrapped.transformer = Container()
    first.wrapped.transformer.text_model = clip.text_model
    first.wrapped.transformer.config = clip_cfg
    clip.text_model.embeddings.token_embedding = EmbeddingsWithFixes(clip.text_model.embeddings.token_embedding)
    first.wrapped.tokenizer = type("Tok", (), {"encoder": tok.vocab, "bpe_ranks": tok.ranks})()
    second = Container()
    second.wrapped = Container()
    second.wrapped.model = open_clip_model(oc_w, heads=o["text_cfg"]["heads"])
    sd_model.conditioner = Container()
    sd_model.conditioner.embedders = nn.ModuleList([first, second, Container()])  # + a size embedder
    sd_model.cond_stage_model = sd_model.conditioner                               # as A1111 sets it
    sd_model.is_sdxl, sd_model.parameterization, sd_model.scale_factor = True, "v", 0.13025

    bundle = bundle_from_webui(sd_model, device="cpu")
    assert bundle.family == "sdxl" and bundle.prediction_type == "v_prediction" and bundle.scale_factor == 0.13025
    assert bundle.text_encoders[1].config.num_attention_heads == 4     # from the MHA, not width // 64
    assert bundle.text_encoders[0].config.hidden_act == "quick_gelu"   # from the WebUI's transformers config

    theirs, ours = checkpoint_state(sd_model), bundle.checkpoint_state_dict()
    assert set(ours) == set(theirs)
    # every parameter of our modules lives in the WebUI's memory (q/k/v as views of the fused in_proj)
    webui_storages = {v.untyped_storage().data_ptr() for v in theirs.values()}
    params = [p for m in bundle.modules().values() for p in m.parameters()]
    assert len(params) > 100 and all(p.untyped_storage().data_ptr() in webui_storages for p in params)
    in_proj = theirs["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert bundle.text_encoders[1].text_model.encoder.layers[0].self_attn.q_proj.weight.data_ptr() == in_proj.data_ptr()

    prompts = ["a red circle", "(blue:1.2) square on a white background"]
    with torch.no_grad():
        got = bundle.encode_prompts(prompts, size=(1024, 768))
        want = ref.encode_prompts(prompts, size=(1024, 768))
        assert torch.allclose(got["context"], want["context"], atol=1e-5)
        assert torch.allclose(got["y"], want["y"], atol=1e-5)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        cond = {k: v[:1] for k, v in got.items()}
        assert torch.allclose(bundle.unet_call(x, t, cond), ref.unet_call(x, t, cond), atol=1e-5)
