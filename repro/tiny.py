"""Tiny random-weight pipelines of the real diffusers classes, built offline: the tests' fast fixture.

`build_tiny_pipeline("flow")` is an SD3 pipeline with SD3.5-M's layout (dual attention, RMS qk-norm, three
text encoders), `build_tiny_pipeline("ddim")` an SD1.x one, `build_tiny_pipeline("flux")` a FluxPipeline with
FLUX.1-dev's layout (double- and single-stream blocks, distilled-guidance embedding, CLIP-L pooled + T5
sequence, dynamic shifting) and `"flux-schnell"` the same without the guidance embedding; all small enough for a
CPU. Their VAE carries colour through (see `_colour_vae`), and `Colour` is a weight-free reward for it: prompts
name a colour. `python -m repro.tiny DIR` saves the flow, ddim and flux pipelines and the colour prompts under
DIR, for progrpo.py's CLI:
    python progrpo.py --pretrained_model_name_or_path DIR/flow --prompts DIR/train.txt ... --reward repro.tiny.Colour
"""

import sys
from pathlib import Path

import torch

from progrpo import RunError

COLOURS = {"red": 0, "green": 1, "blue": 2}


def colour_reward(images, prompts):
    """Weight-free demo reward: how much the prompt's colour word dominates the image, in [-1, 1].

    Mean over pixels of (target channel - mean of the other two). It depends on the prompt, so the model
    has to read the text to raise it, and it varies smoothly with the latent, so groups spread.
    """
    target = torch.tensor([next((c for w, c in COLOURS.items() if w in p.lower()), -1) for p in prompts])
    if (target < 0).any():
        raise RunError(f"the colour reward needs a colour word ({', '.join(COLOURS)}) in every prompt; "
                       f"'{prompts[int((target < 0).nonzero()[0])]}' has none")
    channel_means = images.float().mean(dim=(2, 3))  # (N, 3)
    own = channel_means.gather(1, target.to(images.device)[:, None]).squeeze(1)
    return 1.5 * own - 0.5 * channel_means.sum(1)  # own - mean(other two)


def _tiny_tokenizers():
    """CLIP (byte-level BPE with no merges) and T5 (unigram over letters) tokenizers built in memory."""
    from transformers import CLIPTokenizer, T5Tokenizer

    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]  # GPT-2 byte map
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    clip = [CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77) for _ in range(2)]
    letters = "\u2581abcdefghijklmnopqrstuvwxyz0123456789.,'"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in letters]
    return clip[0], clip[1], T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _tiny_clip_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=len(tokenizer), hidden_act="gelu", attention_dropout=0.0, dropout=0.0,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **extra)


def _colour_vae(latent_channels=4, scaling_factor=1.0, shift_factor=0.0):
    """A tiny AutoencoderKL whose decoder carries latent channels 0..2 through as RGB.

    A random VAE decodes every latent to nearly the same grey image, so a pixel reward could not tell
    trajectories apart. Here every residual block of the decoder is an identity (zeroed conv2 and
    attention output), its one upsampler copies pixels, and channels c, c + 3 carry +z_c, -z_c, so the
    final GroupNorm (one group) subtracts exactly 0 and divides by the rms of z: image_c = 0.6 z_c / rms(z),
    z being what the pipeline hands the decoder (latent / scaling_factor + shift_factor). Latent channels
    past 2 are ignored by the decoder (FLUX's VAE has 16).
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False)  # one 2x upsampling: latents are half the image side
    with torch.no_grad():
        dec = vae.decoder
        for p in dec.parameters():
            p.zero_()
        for c in range(3):
            dec.conv_in.weight[c, c, 1, 1], dec.conv_in.weight[c + 3, c, 1, 1] = 1.0, -1.0
            dec.conv_out.weight[c, c, 1, 1], dec.conv_out.weight[c, c + 3, 1, 1] = 1.0, -1.0  # silu(a) - silu(-a) = a
        dec.up_blocks[0].upsamplers[0].conv.weight[:, :, 1, 1] = torch.eye(8)  # nearest-neighbour upsampling
        dec.conv_norm_out.weight.fill_(0.6)
    return vae


# FLUX.1-dev's scheduler_config.json (configs/flux1dev_scheduler.json): the sigmas are shifted by
# mu = calculate_shift(image tokens), a line through (256, 0.5) and (4096, 1.15); `shift` is unused then.
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# FLUX.1-schnell's: no dynamic shifting and shift 1, so its sigmas are the unshifted linspace.
FLUX_SCHNELL_SCHEDULER = dict(FLUX_DEV_SCHEDULER, shift=1.0, use_dynamic_shifting=False)
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1-dev's (and schnell's) VAE


def _tiny_flux(tok_l, tok_t5, t5_config, guidance_embeds):
    """A FluxPipeline of the real classes with FLUX.1's layout, shrunk: one double-stream (MMDiT) block and one
    single-stream block, 2 heads of 16 (rope axes 4 + 6 + 6, as FLUX's 16 + 56 + 56 = 128), 16 latent channels
    packed 2x2 into 64 transformer channels, CLIP-L's pooled output (32) and T5's sequence (32) as conditioning,
    the distilled-guidance embedding when `guidance_embeds` (dev) and not (schnell), FLUX's VAE factors and
    scheduler. The VAE halves the image side (vae_scale_factor 2), so image sides are multiples of 4."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_config.d_model, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER))
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_colour_vae(16, **FLUX_VAE_FACTORS),
        text_encoder=CLIPTextModel(_tiny_clip_config(tok_l)), tokenizer=tok_l,
        text_encoder_2=T5EncoderModel(t5_config), tokenizer_2=tok_t5)


def build_tiny_pipeline(kind="flow", seed=0):
    """A random-weight pipeline of the real classes, small enough for a CPU, built offline.

    kind 'flow': StableDiffusion3Pipeline with SD3.5-M's layout (dual attention, RMS qk-norm, three text
    encoders); kind 'ddim': StableDiffusionPipeline (SD-v1.4's UNet layout, DDIM with its schedule);
    kind 'flux' / 'flux-schnell': FluxPipeline with FLUX.1-dev's / FLUX.1-schnell's layout (see _tiny_flux).
    The denoiser and text encoders are random; the VAE carries colour through (see _colour_vae).
    """
    from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok_l, tok_g, tok_t5 = _tiny_tokenizers()
    t5 = T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=len(tok_t5), dropout_rate=0.0,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # SD3's third encoder, FLUX's second
    if kind == "ddim":
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            norm_num_groups=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                  clip_sample=False, set_alpha_to_one=False)  # SD-v1.4's
        pipe = StableDiffusionPipeline(vae=_colour_vae(), text_encoder=CLIPTextModel(_tiny_clip_config(tok_l)),
                                       tokenizer=tok_l, unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    elif kind in ("flux", "flux-schnell"):
        pipe = _tiny_flux(tok_l, tok_t5, t5, guidance_embeds=kind == "flux")
    else:
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=64,
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_colour_vae(),
            text_encoder=CLIPTextModelWithProjection(_tiny_clip_config(tok_l, projection_dim=32)), tokenizer=tok_l,
            text_encoder_2=CLIPTextModelWithProjection(_tiny_clip_config(tok_g, projection_dim=32)), tokenizer_2=tok_g,
            text_encoder_3=T5EncoderModel(t5), tokenizer_3=tok_t5)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def Colour(device):
    """The colour reward as a reward factory (`--reward repro.tiny.Colour`): it loads nothing."""
    return colour_reward


OBJECTS = ["apple", "car", "bird", "house", "flower", "boat", "cup", "kite"]
EVAL_OBJECTS = ["chair", "dog", "lamp", "tree"]


def colour_prompts(held_out=False):
    """'a red apple', ...: training objects, or held-out objects for evaluation."""
    return [f"a {c} {o}" for o in (EVAL_OBJECTS if held_out else OBJECTS) for c in COLOURS]


def save_tiny(directory):
    """The tiny pipelines (flow/, ddim/, flux/: FLUX.1-dev's layout) and the colour prompts (train.txt, test.txt)
    under `directory`."""
    directory = Path(directory)
    for kind in ("flow", "ddim", "flux"):
        build_tiny_pipeline(kind).save_pretrained(directory / kind)
    (directory / "train.txt").write_text("\n".join(colour_prompts()) + "\n")
    (directory / "test.txt").write_text("\n".join(colour_prompts(held_out=True)) + "\n")
    return directory


if __name__ == "__main__":
    save_tiny(sys.argv[1] if len(sys.argv) > 1 else "outputs/tiny")
