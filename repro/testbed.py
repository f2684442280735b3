"""What the pretrained CPU testbeds (repro/digits.py, repro/shapes.py) share: an SD3 pipeline of the tiny frozen
text encoders and a testbed-sized transformer, and its pretraining by rectified-flow matching."""

import math
import time

import torch
import torch.nn.functional as F

import progrpo
from repro.tiny import build_tiny_pipeline

SHIFT = 3.0  # SD3's sampler shift, used for the training sigmas as well


def build_pipeline(make_vae, side, channels, max_sequence_length, num_layers, heads=2, seed=0):
    """progrpo's tiny SD3 pipeline (its text encoders, tokenizers, scheduler) with a transformer over a `channels`
    x `side` x `side` latent in 2x2 patches (SD3.5's layout: a dual attention block, RMS qk-norm) and the VAE
    make_vae() returns, made after the transformer (torch's generator, seeded here, draws for both)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    tiny = build_tiny_pipeline("flow", seed=seed)  # seeds torch: the text encoders are reproducible
    for tokenizer in (tiny.tokenizer, tiny.tokenizer_2):  # CLIP pads to this, not 77, text tokens per stream
        tokenizer.model_max_length = max_sequence_length  # (the captions are short; it cuts the transformer's cost)
    text_dim = tiny.text_encoder_3.config.d_model
    pooled_dim = tiny.text_encoder.config.projection_dim + tiny.text_encoder_2.config.projection_dim
    transformer = SD3Transformer2DModel(
        sample_size=side, patch_size=2, in_channels=channels, out_channels=channels, num_layers=num_layers,
        attention_head_dim=32, num_attention_heads=heads, joint_attention_dim=text_dim,
        caption_projection_dim=32 * heads, pooled_projection_dim=pooled_dim, pos_embed_max_size=side,
        dual_attention_layers=(0,), qk_norm="rms_norm")
    return StableDiffusion3Pipeline(**{**tiny.components, "transformer": transformer, "vae": make_vae()})


def sample_args(resolution, max_sequence_length, guidance_scale, batch_size=64):
    """The progrpo.Args fields that progrpo.sample_deterministic and encode_prompts read."""
    return progrpo.Args(resolution=resolution, guidance_scale=guidance_scale, sample_batch_size=batch_size,
                        decode_batch_size=batch_size, max_sequence_length=max_sequence_length)


def pretrain(pipe, captions, draw, steps, max_sequence_length, batch_size, lr=2e-3, drop_caption=0.1,
             ema_decay=0.999, seed=0, log=print):
    """Rectified-flow matching of the transformer; leaves the EMA weights in it.

    draw(g, batch_size) -> (x0, rows): a batch of clean latents (scaled as the VAE config says) and the rows of
    `captions` they show, from the seeded generator g (or a generator of its own). Per step: noise ~ N(0, I),
    sigma = shift(u) with u ~ logit-normal(0, 1), x_sigma = (1 - sigma) x0 + sigma noise, and the MSE of the
    model's v against noise - x0 at timestep 1000 sigma (progrpo's sampler uses the same timesteps); a caption
    is replaced by the empty prompt with probability drop_caption, for guidance. The captions' embeddings are
    computed once (the text encoders are frozen). AdamW with 50 warm-up steps and a cosine decay to lr / 10.
    """
    model = pipe.transformer
    with torch.no_grad():  # rows 0..n-1 the captions, row n the empty prompt
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(captions) + [""], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train().requires_grad_(True)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    t0, running = time.time(), 0.0
    for step in range(steps):
        x0, rows = draw(g, batch_size)
        noise = torch.randn(x0.shape, generator=g)
        u = torch.sigmoid(torch.randn(batch_size, generator=g))  # logit-normal(0, 1)
        sigma = SHIFT * u / (1 + (SHIFT - 1) * u)  # the scheduler's shift, as SD3 samples training timesteps
        x = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        drop = torch.rand(batch_size, generator=g) < drop_caption  # the empty prompt, for guidance
        rows = torch.where(drop, len(captions), rows)
        v = model(x, timestep=1000 * sigma, encoder_hidden_states=embeds[rows], pooled_projections=pooled[rows],
                  return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            progrpo.ema_update(ema, params, step, decay=ema_decay, every=1)  # Flow-GRPO's schedule, every step
        running += loss.item()
        if log and (step + 1) % 100 == 0:
            log(f"step {step + 1}/{steps} | flow-matching loss {running / 100:.4f} | {time.time() - t0:.0f}s")
            running = 0.0
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    model.eval().requires_grad_(False)
    return pipe
