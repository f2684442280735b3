"""FLUX.1 preparation: the tiny random FluxPipeline (repro/tiny.py, saved under flux/ by save_tiny) runs through
diffusers' own FluxPipeline, and the published FLUX.1-dev configs (configs/flux1dev_*.json) build the real
classes on the meta device with the published parameter counts. Cheap: a few tiny forwards and meta builds."""

import json
import math
from pathlib import Path

import numpy as np
import torch

import repro.tiny as tiny_models

ROOT = Path(__file__).resolve().parent.parent
# Flow-GRPO's LoRA targets for FLUX.1-dev (scripts/train_flux.py): suffixes of module names
FLOW_GRPO_FLUX_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                          "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                          "ff_context.net.2"]


def packed_latents(pipe, batch, side, seed=0):
    """Gaussian latents for a side x side image, packed the way FluxPipeline packs them: (B, tokens, 4 C)."""
    from diffusers import FluxPipeline

    lat = 2 * (side // (pipe.vae_scale_factor * 2))
    z = torch.randn(batch, 16, lat, lat, generator=torch.Generator().manual_seed(seed))
    return z, FluxPipeline._pack_latents(z, batch, 16, lat, lat)


def test_tiny_flux_folder_loads_and_generates_with_diffusers(tiny_dir):
    """diffusers' FluxPipeline loads the saved folder (FLUX.1-dev's layout and scheduler) and turns given packed
    latents into finite images that carry colour, the same as the in-memory pipeline."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = FluxPipeline.from_pretrained(str(tiny_dir / "flux"))
    assert type(pipe) is FluxPipeline and pipe.transformer.config.guidance_embeds
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 64
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert {k: pipe.scheduler.config[k] for k in tiny_models.FLUX_DEV_SCHEDULER} == tiny_models.FLUX_DEV_SCHEDULER
    assert pipe.vae_scale_factor == 2  # so image sides are multiples of 4 (2x2 packing of the latent)

    z, latents = packed_latents(pipe, 2, 16)
    assert latents.shape == (2, 16, 64)
    assert torch.equal(FluxPipeline._unpack_latents(latents, 16, 16, pipe.vae_scale_factor), z)
    call = dict(prompt=["a red apple", "a blue car"], height=16, width=16, num_inference_steps=3, guidance_scale=3.5,
                max_sequence_length=16, output_type="pt")
    images = pipe(latents=latents, **call).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all() and images.std() > 0.05
    built = tiny_models.build_tiny_pipeline("flux")(latents=latents, **call).images
    assert torch.equal(images, built)  # the folder is the pipeline build_tiny_pipeline makes

    # dynamic shifting: mu from the packed sequence length (16 tokens), FLUX's sigmas linspace(1, 1/N, N) shifted
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    sigmas = np.linspace(1.0, 1 / 3, 3)
    shifted = math.exp(mu) / (math.exp(mu) + 1 / sigmas - 1)
    assert torch.allclose(pipe.scheduler.sigmas, torch.tensor([*shifted, 0.0], dtype=torch.float32), atol=1e-6)

    # the decoder carries latent channels 0..2 through as RGB: a latent leaning on channel c decodes to colour c
    lean = torch.zeros(3, 16, 8, 8)
    for c in range(3):
        lean[c, c] = 2.0
    image = pipe.vae.decode(lean / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    assert (image.mean(dim=(2, 3)).argmax(1) == torch.arange(3)).all()


def test_tiny_flux_transformer_call_matches_the_pipeline(tiny_dir):
    """The call a trainer makes (FluxPipeline's): encode_prompt -> (T5 sequence, CLIP pooled, zero text ids),
    timestep = sigma (t / 1000; the model scales it and the guidance by 1000), guidance = the distilled scale
    per sample, 2-D img_ids / txt_ids. One Euler step by hand equals the pipeline's."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny_dir / "flux"))
    _, latents = packed_latents(pipe, 2, 16, seed=1)
    prompts = ["a green bird", "a red kite"]
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)
    assert embeds.shape == (2, 16, 32) and pooled.shape == (2, 32) and text_ids.shape == (16, 3) and not text_ids.any()
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)  # (tokens, 3): (0, row, col)
    assert img_ids.shape == (16, 3) and img_ids[5].tolist() == [0.0, 1.0, 1.0]

    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents, height=16, width=16,
               num_inference_steps=1, guidance_scale=3.5, output_type="latent").images
    sigma = pipe.scheduler.sigmas[0]  # 1.0: the first sigma is unshifted
    with torch.no_grad():
        v = pipe.transformer(hidden_states=latents, encoder_hidden_states=embeds, pooled_projections=pooled,
                             timestep=(sigma * 1000).expand(2) / 1000, img_ids=img_ids, txt_ids=text_ids,
                             guidance=torch.full((2,), 3.5), return_dict=False)[0]
    assert torch.allclose(out, latents + (0.0 - sigma) * v, atol=1e-6)


def test_tiny_flux_schnell_builds_and_generates():
    """The schnell-shaped variant: no guidance embedding, no dynamic shifting (shift 1: unshifted sigmas)."""
    from diffusers import FluxPipeline

    pipe = tiny_models.build_tiny_pipeline("flux-schnell")
    assert not pipe.transformer.config.guidance_embeds and not pipe.scheduler.config.use_dynamic_shifting
    _, latents = packed_latents(pipe, 1, 8)
    images = pipe(prompt=["a blue cup"], latents=latents, height=8, width=8, num_inference_steps=2,
                  max_sequence_length=8, output_type="pt").images
    assert isinstance(pipe, FluxPipeline) and images.shape == (1, 3, 8, 8) and torch.isfinite(images).all()
    assert torch.allclose(pipe.scheduler.sigmas, torch.tensor([1.0, 0.5, 0.0]))


def test_flux1dev_configs_build_on_meta_with_published_counts():
    """configs/flux1dev_*.json build diffusers' / transformers' real classes on the meta device: the ~11.9 B
    transformer, the 16-channel VAE, CLIP-L and the T5-XXL encoder; Flow-GRPO's LoRA targets hit 342 linears."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def read(name):
        return json.loads((ROOT / "configs" / name).read_text())

    def count(model):
        return sum(p.numel() for p in model.parameters())

    enc = read("flux1dev_text_encoders.json")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(read("flux1dev_transformer.json"))
        vae = AutoencoderKL.from_config(read("flux1dev_vae.json"))
        clip = CLIPTextModel(CLIPTextConfig(**enc["clip_l"]))
        t5 = T5EncoderModel(T5Config(**enc["t5"]))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(read("flux1dev_scheduler.json"))
    assert next(transformer.parameters()).is_meta
    assert count(transformer) == 11_901_408_320
    assert count(vae) == 83_819_683 and count(clip) == 123_060_480 and count(t5) == 4_762_310_656
    assert transformer.config.axes_dims_rope == (16, 56, 56) and transformer.out_channels == 64
    assert (vae.config.scaling_factor, vae.config.shift_factor, vae.config.latent_channels) == (0.3611, 0.1159, 16)
    assert scheduler.config.use_dynamic_shifting and scheduler.config.max_shift == 1.15
    pipe = FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=clip, tokenizer=None,
                        text_encoder_2=t5, tokenizer_2=None)
    assert pipe.vae_scale_factor == 8  # 512 px -> 64 x 64 latent -> 32 x 32 = 1024 packed tokens

    hits = [name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
            and any(name.endswith("." + t) for t in FLOW_GRPO_FLUX_TARGETS)]
    assert len(hits) == 19 * 12 + 38 * 3  # double blocks: all 12; single blocks: attn.to_q / to_k / to_v only

