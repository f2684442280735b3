"""Preflight: a preset's GPU path end to end in minutes, before a long run spends hours in a queue to find it broken.

`python -m repro.preflight [preset ...]` (or `bash run.sh preflight [preset ...]`, default sd35) builds the
preset's real denoiser and VAE from configs/ with random weights (no download, on the real device), stand-in
text embeddings of the shapes the real encoders give, and a stand-in reward of the real reward model's
architecture (PickScore's CLIP-H, which is also HPSv2.1's ViT-H-14). It then runs one short epoch (a prompt or
two, but the preset's group sizes, micro-batches, precision, schedule and update) through progrpo's own
rollout() and train_epoch(): once at learning rate 0, once at the preset's learning rate. It prints:

  1. the largest first-step |ratio - 1| (train_epoch's first_step_ratio_dev): weights as sampled, so anything
     above float error is a rollout/update mismatch; above the clip range the very first step already clips;
  2. the clip fraction at learning rate 0 (unchanged weights all epoch: it should be 0);
  3. the gradient norm before clipping at the preset's learning rate (finite and non-zero; fp16 steps that the
     loss scaler skipped for overflow are counted and left out), the largest weight change, and the reward's
     within-group std (a random reward that did not spread would leave no advantage to train on);
  4. peak GPU memory of sampling and of the update (torch.cuda.max_memory_allocated, reset in between), and
     the latents a full epoch's prompts would add: rollout() samples all of a rank's prompts at once;
  5. seconds per guided evaluation (a CFG pair, at the sampling micro-batch), per decoded-and-scored image,
     and per trained trajectory-step (forward, reference forward when beta > 0, backward);
  6. the projected wall-clock of one full epoch per rank: repro.flops.epoch_flops' counts with those seconds
     in place of FLOPs; with two presets (`sd35 sd35-baseline`) also the ratio of the projected epoch times,
     the wall-clock counterpart of the paper's 1.26x.

Without CUDA it runs the same code at a tiny size (the configs shrunk by SHRINK, 64 px, fp32 unless
--mixed_precision says otherwise) in a minute or two, and says that its figures are CPU figures. It exits 1
when a check fails (first-step ratio at or above the clip range, clipping at lr 0, no usable gradient, no weight
moved), 2 on bad input.

Left out of the projection: the text encoders (stand-ins here; one call per prompt per epoch), evaluation,
checkpoints, and the all-reduce of gradients between ranks. Per-call seconds are measured at full micro-batches,
as a full epoch's prompts fill them; the short epoch's own sampling time is printed beside their prediction.

Run:
  bash run.sh preflight                        # sd35 on this machine's GPUs (run.sh passes its world size)
  bash run.sh preflight sd35 sd35-baseline     # also the ratio of projected epoch times
  bash run.sh preflight flux flux-baseline     # FLUX.1-dev's 12B transformer: bf16, one 80 GB GPU
  python -m repro.preflight sd14 --prompts 2 --world_size 8 --mixed_precision fp16
"""

import argparse
import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from progrpo import (DTYPES, Args, RunError, denoiser, group_advantages, latent_shape, live_counts, predict, refuse,
                     rollout, sampler_schedule, score, train_epoch, trainable_parameters, validate)
from repro.flops import FLOPS_PRESETS, clip_reward, epoch_flops

# run.sh is the source of these flags (its SD35, SD14 and FLUX arrays): what FLOPS_PRESETS, which holds each
# preset's family, group size and prune schedule, does not already say. Keep the three in step.
RUN_SH_FLAGS = {
    "flow": dict(mixed_precision="fp16", resolution=512, num_steps=10, noise_level=0.7, guidance_scale=4.5,
                 prompts_per_epoch=48, learning_rate=3e-4, clip_range=1e-4, beta=0.01, rank=32, lora_alpha=64,
                 ema=True, sample_batch_size=8, train_batch_size=8),
    "ddim": dict(mixed_precision="bf16", resolution=512, noise_level=1.0, guidance_scale=5.0, learning_rate=1e-5,
                 clip_range=1e-4, sample_batch_size=8, train_batch_size=8, ema=False),
    "flux": dict(mixed_precision="bf16", resolution=512, num_steps=6, noise_level=0.9, guidance_scale=3.5,
                 prompts_per_epoch=48, learning_rate=3e-4, clip_range=1e-4, beta=0.0, rank=64, lora_alpha=128, ema=True,
                 sample_batch_size=3, train_batch_size=3),
}
PROMPTS_PER_RANK = {"ddim"}  # run.sh gives sd14 4 prompts per GPU (--prompts_per_epoch 4 x world); sd35 splits 48
CONFIGS = {  # the architecture configs of each family (configs/README.md says where they come from)
    "flow": dict(denoiser="sd35m_transformer.json", vae="sd35m_vae.json", scheduler="sd35m_scheduler.json"),
    "ddim": dict(denoiser="sd14_unet.json", vae="sd14_vae.json", scheduler="sd14_scheduler.json"),
    "flux": dict(denoiser="flux1dev_transformer.json", vae="flux1dev_vae.json", scheduler="flux1dev_scheduler.json"),
}
# The CPU size: the same configs with fewer and narrower layers, so the same build code runs in seconds. Latent
# channels, VAE depth (the 8x downsampling), text lengths and the schedule stay the real ones.
TINY_VAE = dict(block_out_channels=[16] * 4, layers_per_block=1, norm_num_groups=8)
SHRINK = {
    "sd35m_transformer.json": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=64,
                                   caption_projection_dim=32, pooled_projection_dim=32, dual_attention_layers=[0],
                                   pos_embed_max_size=32),
    "sd35m_vae.json": TINY_VAE,
    "sd14_unet.json": dict(block_out_channels=[32] * 4, layers_per_block=1, cross_attention_dim=32),
    "sd14_vae.json": TINY_VAE,
    "flux1dev_transformer.json": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                      joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]),
    "flux1dev_vae.json": TINY_VAE,
    "pickscore_clip.json": dict(projection_dim=32,
                                text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                 num_hidden_layers=1, projection_dim=32),
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                   num_hidden_layers=1, patch_size=8, image_size=32,
                                                   projection_dim=32)),
}
TINY_RESOLUTION = 64
GIB = 2**30


def merged(config, changes):
    """config with `changes` applied, nested dicts merged key by key (CLIP's text_config and vision_config)."""
    out = dict(config)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) else value
    return out


def read_config(config_dir, name, tiny):
    """One architecture config from config_dir, shrunk to the CPU size when `tiny`."""
    path = Path(config_dir) / name
    if not path.is_file():
        raise RunError(f"architecture config '{path}' not found; give --configs the folder of the published configs")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise RunError(f"architecture config '{path}' is not a JSON config ({e})") from None
    return merged(config, SHRINK.get(name, {})) if tiny else config


def preset_args(name, world, tiny, mixed_precision=None):
    """(family, Args of the preset as run.sh runs it, prompts each rank samples per epoch).

    The tiny size runs fp32 unless mixed_precision says otherwise: CPU autocast is not the GPU's, and fp32 makes
    the first-step ratio exact up to round-off."""
    if name not in FLOPS_PRESETS:
        raise RunError(f"unknown preset '{name}'; choose from {', '.join(FLOPS_PRESETS)}")
    kind, flags = FLOPS_PRESETS[name]
    args = Args(**{**RUN_SH_FLAGS[kind], **flags})
    if kind in PROMPTS_PER_RANK:
        per_rank = args.prompts_per_epoch
    elif args.prompts_per_epoch % world:
        raise RunError(f"{name}: its {args.prompts_per_epoch} prompts per epoch do not split over --world_size {world}")
    else:
        per_rank = args.prompts_per_epoch // world
    if tiny:
        args = dataclasses.replace(args, resolution=TINY_RESOLUTION, mixed_precision="no")
    if mixed_precision:
        args = dataclasses.replace(args, mixed_precision=mixed_precision)
    return kind, args, per_rank


def build_pipeline(config_dir, kind, args, device, tiny):
    """The family's pipeline from configs/ with random weights, placed and typed as progrpo.load_pipeline does:
    the VAE fp32, a fully fine-tuned denoiser fp32, a LoRA'd one in the half dtype; all frozen, in eval mode.
    No text encoders or tokenizers: stand_in_text gives their outputs."""
    from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)

    names = CONFIGS[kind]
    with torch.device(device):  # weights are initialised where they will run: seconds even for SD3.5-M
        vae = AutoencoderKL.from_config(read_config(config_dir, names["vae"], tiny))
        if kind == "flow":
            model = SD3Transformer2DModel.from_config(read_config(config_dir, names["denoiser"], tiny))
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(read_config(config_dir, names["scheduler"], tiny))
            pipe = StableDiffusion3Pipeline(transformer=model, scheduler=scheduler, vae=vae, text_encoder=None,
                                            tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                            text_encoder_3=None, tokenizer_3=None)
        elif kind == "flux":
            model = FluxTransformer2DModel.from_config(read_config(config_dir, names["denoiser"], tiny))
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(read_config(config_dir, names["scheduler"], tiny))
            pipe = FluxPipeline(transformer=model, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                text_encoder_2=None, tokenizer_2=None)
        else:  # progrpo.load_pipeline swaps SD1's PNDM scheduler for DDIM with the same config
            model = UNet2DConditionModel.from_config(read_config(config_dir, names["denoiser"], tiny))
            scheduler = DDIMScheduler.from_config(read_config(config_dir, names["scheduler"], tiny))
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=model, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    dtype = torch.float32 if args.full_finetune else DTYPES[args.mixed_precision]
    if dtype != torch.float32:  # built in fp32, cast as load_pipeline's from_pretrained(dtype=...) loads it
        from diffusers.utils import logging

        level = logging.get_verbosity()
        logging.set_verbosity_error()  # silences "modules that should be kept in float32: []": SD3 and SD1 have none
        model.to(dtype)
        logging.set_verbosity(level)
    for module in (model, vae):
        module.requires_grad_(False).eval()
    return pipe


def stand_in_text(pipe, n_prompts, args, generator):
    """Random conditioning of the shapes progrpo.encode_prompts returns: the prompts' rows and the negative's.

    SD3: embeds (B, 77 + max_sequence_length, joint_attention_dim), pooled (B, pooled_projection_dim); SD1: embeds
    (B, 77, cross_attention_dim); `negative` one row of each. FLUX: embeds (B, max_sequence_length,
    joint_attention_dim), pooled (B, pooled_projection_dim), no negative (distilled guidance). In the frozen encoders'
    dtype, as theirs would be.
    """
    model = denoiser(pipe)
    kw = dict(generator=generator, device=model.device)
    dtype = DTYPES[args.mixed_precision]
    if type(pipe).__name__ == "FluxPipeline":
        return dict(embeds=torch.randn(n_prompts, args.max_sequence_length, model.config.joint_attention_dim,
                                       **kw).to(dtype),
                    pooled=torch.randn(n_prompts, model.config.pooled_projection_dim, **kw).to(dtype))
    if hasattr(pipe, "transformer"):
        length, width = 77 + args.max_sequence_length, model.config.joint_attention_dim
        rows = dict(embeds=torch.randn(n_prompts + 1, length, width, **kw).to(dtype),
                    pooled=torch.randn(n_prompts + 1, model.config.pooled_projection_dim, **kw).to(dtype))
    else:
        rows = dict(embeds=torch.randn(n_prompts + 1, 77, model.config.cross_attention_dim, **kw).to(dtype))
    return dict({k: v[:-1] for k, v in rows.items()}, negative={k: v[-1:] for k, v in rows.items()})


def stand_in_reward(config_dir, device, tiny):
    """PickScore's architecture (transformers CLIPModel, CLIP-H) with random weights, scored as ClipScore scores
    (repro.flops.clip_reward: token ids instead of a tokenizer), returning progrpo's (N,) fp32 CPU rewards."""
    from transformers import CLIPConfig, CLIPModel

    with torch.device(device):
        clip = CLIPModel(CLIPConfig(**read_config(config_dir, "pickscore_clip.json", tiny)))
    scorer = clip_reward(clip.eval().requires_grad_(False))
    return lambda images, prompts: scorer(images, prompts).float().cpu()


def synced_time(device):
    """Wall-clock seconds after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def median_seconds(fn, device, repeats=3):
    """Median wall-clock seconds of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        start = synced_time(device)
        fn()
        times.append(synced_time(device) - start)
    return sorted(times)[repeats // 2]


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    """Peak GPU memory since reset_peak; on CPU the process's peak RSS so far (it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports kB


def finite_mean(values):
    """Mean of the finite entries (an fp16 step skipped for overflow has an inf norm); NaN when there are none."""
    finite = values[torch.isfinite(values)]
    return finite.mean().item() if len(finite) else math.nan


def short_epoch(name, opts, device, tiny):
    """One short epoch of the preset through rollout() and train_epoch() at lr 0 and at its lr; its figures."""
    kind, args, per_rank = preset_args(name, opts.world_size, tiny, opts.mixed_precision)
    schedule = validate(args)
    n_prompts = min(opts.prompts, per_rank)
    prompts = [f"preflight prompt {p}" for p in range(n_prompts)]
    pipe = build_pipeline(opts.configs, kind, args, device, tiny)
    reward_fn = stand_in_reward(opts.configs, device, tiny)
    text = stand_in_text(pipe, n_prompts, args, torch.Generator(device).manual_seed(args.seed))
    torch.manual_seed(args.seed)  # as progrpo.main: the LoRA initialisation
    params = trainable_parameters(pipe, args)
    latent = latent_shape(pipe, args.resolution)  # one trajectory's

    # warm-up outside the timings: CUDA kernels load and cuDNN picks its algorithms on first use
    x = torch.randn(args.sample_batch_size, *latent, device=device)
    steps = torch.zeros(args.sample_batch_size, dtype=torch.long, device=device)
    rows = torch.zeros(args.sample_batch_size, dtype=torch.long, device=device)
    sched = sampler_schedule(pipe, args.num_steps, args.resolution, device)
    to_score = x[:args.reward_batch_size]  # latents: score() decodes them
    with torch.no_grad():
        predict(pipe, sched, steps, x, text, rows, args, args.sample_batch_size)
        score(pipe, to_score, prompts[:1] * len(to_score), reward_fn, args, dict(decodes=0))

    reset_peak(device)
    t0 = synced_time(device)
    samples, stats, _ = rollout(pipe, text, prompts, reward_fn, args, epoch=0, schedule=schedule)
    t1 = synced_time(device)
    peak_sample = peak_gib(device)
    adv = group_advantages(samples["rewards"], samples["prompt_idx"], clip=args.adv_clip_max,
                           global_std=args.global_std).to(device)

    # one loss scaler for both updates, as a run keeps its own across epochs: fp16's first steps may overflow at
    # the initial scale and be skipped while it backs off, which the lr-0 update absorbs
    scaler = torch.amp.GradScaler(device.type, enabled=DTYPES[args.mixed_precision] == torch.float16)

    def update(lr):  # a fresh optimiser each time, as on a run's first epoch
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.adam_weight_decay)
        ema = [p.detach().clone() for p in params] if args.ema else None
        reset_peak(device)
        start = synced_time(device)
        info = train_epoch(pipe, params, optimizer, scaler, samples, adv, text, args, epoch=0, ema=ema)
        return info, synced_time(device) - start, peak_gib(device)

    info_lr0, _, _ = update(0.0)  # also the update's warm-up
    before = [p.detach().to("cpu", copy=True) for p in params]  # off the GPU: it would inflate the peak
    info, t_update, peak_update = update(args.learning_rate)
    moved = max((p.detach().cpu() - b).abs().max().item() for p, b in zip(params, before))

    # seconds per call at the preset's full micro-batches (a full epoch's B prompts fill every batch), the median
    # of three calls so that one slow call on a shared machine does not set the projection
    with torch.no_grad():
        s_eval = median_seconds(lambda: predict(pipe, sched, steps, x, text, rows, args, len(x)), device) / len(x)
        s_image = median_seconds(lambda: score(pipe, to_score, prompts[:1] * len(to_score), reward_fn, args,
                                               dict(decodes=0)), device) / len(to_score)
    n_train = int(args.num_steps * args.timestep_fraction)
    seconds = dict(model=s_eval, decode=s_image, reward=0.0,  # decode holds decode and reward together
                   train=t_update / (len(adv) * n_train), reference=0.0)  # a trained step includes its reference
    short = epoch_flops(seconds, dataclasses.replace(args, prompts_per_epoch=n_prompts), schedule)
    full = epoch_flops(seconds, dataclasses.replace(args, prompts_per_epoch=per_rank), schedule)
    # latents held per prompt at the fullest moment of sampling: a full epoch holds them for all its prompts
    alive, latent_bytes = live_counts(args.num_steps, args.group_size, schedule), 4 * math.prod(latent)
    held = max(max((i + 1) * n for i, n in enumerate(alive)), (args.num_steps + 1) * alive[-1]) * latent_bytes
    return dict(name=name, kind=kind, args=args, schedule=schedule, n_prompts=n_prompts, per_rank=per_rank,
                nfe=stats["nfe"] // n_prompts, kept=len(adv) // n_prompts, n_params=sum(p.numel() for p in params),
                ratio_dev=info_lr0["first_step_ratio_dev"].max().item(),
                ratio_dev_lr=info["first_step_ratio_dev"].max().item(),
                clipfrac_lr0=info_lr0["clipfrac"].mean().item(), clipfrac=info["clipfrac"].mean().item(),
                grad_norm=finite_mean(info["grad_norm"]), moved=moved,
                skipped=int(info_lr0["skipped"].sum() + info["skipped"].sum()),
                n_steps=len(info_lr0["skipped"]) + len(info["skipped"]),
                reward_std=samples["rewards"].view(n_prompts, -1).std(1, correction=0).mean().item(),
                peak_sample=peak_sample, peak_update=peak_update, extra_latents=(per_rank - n_prompts) * held / GIB,
                s_eval=seconds["model"], s_image=seconds["decode"], s_step=seconds["train"],
                t_sample=t1 - t0, t_update=t_update, t_sample_predicted=short["sampling"] + short["checkpoints"]
                + short["final"], projected=full)


def checks(r):
    """The figures' verdicts: a list of problems, empty when the preset is ready to queue."""
    problems = []
    if not r["ratio_dev"] < r["args"].clip_range:  # also catches NaN
        problems.append(f"first-step |ratio - 1| {r['ratio_dev']:.2e} is not below the clip range "
                        f"{r['args'].clip_range:g}: sampling and update disagree (batch size, dtype, CFG)")
    if not r["clipfrac_lr0"] == 0:
        problems.append(f"clipfrac {r['clipfrac_lr0']:.3f} at learning rate 0: unchanged weights should never clip")
    if not (math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0):
        problems.append(f"gradient norm {r['grad_norm']} at the preset's learning rate (needs finite and > 0; "
                        f"{r['skipped']} of {r['n_steps']} steps skipped)")
    if not r["moved"] > 0:
        problems.append("no weight changed at the preset's learning rate")
    return problems


def report(r, device, tiny):
    """The preset's figures, one per line, `label: value`."""
    a, proj = r["args"], r["projected"]
    memory = "GiB (torch.cuda.max_memory_allocated)" if device.type == "cuda" else "GiB (CPU: process peak RSS so far)"
    precision = {"no": "fp32"}.get(a.mixed_precision, a.mixed_precision)
    group = " -> ".join(str(k) for k in [a.group_size] + [k for _, k in r["schedule"]])
    group += f" at steps {','.join(str(s) for s, _ in r['schedule'])}" if r["schedule"] else ", no pruning"
    lines = [f"== {r['name']}: {r['kind']} family, G {group}, T {a.num_steps}; {r['nfe']} NFE and {r['kept']} trained "
             f"per group; precision {precision}, {a.resolution} px, micro-batches {a.sample_batch_size} sampling / "
             f"{a.train_batch_size} update; "
             f"{'full fine-tune' if a.full_finetune else f'LoRA r={a.rank} alpha={a.lora_alpha}'}, beta {a.beta:g}; "
             f"{r['n_params']:,} trainable parameters"]
    if tiny:
        lines.append(f"   CPU figures: tiny configs (repro.preflight.SHRINK), precision {precision}; "
                     "not a GPU's speed or memory")
    lines += [
        f"   first-step |ratio - 1|: {r['ratio_dev']:.3e} (clip range {a.clip_range:g}; "
        f"{r['ratio_dev_lr']:.3e} at lr {a.learning_rate:g})",
        f"   clipfrac at lr 0: {r['clipfrac_lr0']:.4f} (at lr {a.learning_rate:g}: {r['clipfrac']:.4f})",
        f"   grad norm: {r['grad_norm']:.4e} (before clipping, mean of the lr {a.learning_rate:g} optimiser steps; "
        f"{r['skipped']} of {r['n_steps']} steps skipped by the loss scaler; largest weight change {r['moved']:.2e})",
        f"   reward group std: {r['reward_std']:.4e} (random-weight reward; 0 would leave no advantage to train on)",
        f"   peak memory sampling: {r['peak_sample']:.3f} {memory}; a full epoch's {r['per_rank']} prompts hold "
        f"~{r['extra_latents']:.3f} GiB more latents",
        f"   peak memory update: {r['peak_update']:.3f} {memory}",
        f"   seconds per guided evaluation: {r['s_eval']:.4e} (a CFG pair or one distilled call, micro-batch "
        f"{a.sample_batch_size})",
        f"   seconds per decoded and scored image: {r['s_image']:.4e} (micro-batch {a.reward_batch_size})",
        f"   seconds per trained step: {r['s_step']:.4e} (one trajectory-step: forward"
        f"{', reference forward' if a.beta > 0 else ''}, backward; micro-batch {a.train_batch_size})",
        f"   short epoch ({r['n_prompts']} prompt): sampling {r['t_sample']:.2f} s (the per-call figures predict "
        f"{r['t_sample_predicted']:.2f} s at full micro-batches), update at lr {a.learning_rate:g} "
        f"{r['t_update']:.2f} s",
        f"   projected epoch: {proj['total']:.1f} s per rank ({r['per_rank']} prompts per rank): sampling "
        f"{proj['sampling']:.1f} + decode/reward {proj['checkpoints'] + proj['final']:.1f} + update "
        f"{proj['update']:.1f}"]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("presets", nargs="*", default=["sd35"], help=f"any of {', '.join(FLOPS_PRESETS)}")
    parser.add_argument("--prompts", type=int, default=1, help="prompts in the short epoch (each a whole group)")
    default_world = max(1, torch.cuda.device_count())
    parser.add_argument("--world_size", type=int, default=default_world,
                        help="ranks of the projected run (run.sh launches one per visible GPU)")
    parser.add_argument("--configs", default="configs", help="folder of the published architecture configs")
    parser.add_argument("--tiny", action="store_true", help="the CPU size even on a GPU (always so without CUDA)")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"),
                        help="instead of the preset's (default: the preset's; fp32 at the tiny size)")
    opts = parser.parse_args(argv)
    refuse([(opts.prompts < 1, f"--prompts must be at least 1 (got {opts.prompts})"),
            (opts.world_size < 1, f"--world_size must be at least 1 (got {opts.world_size})"),
            (not Path(opts.configs).is_dir(),
             f"--configs '{opts.configs}' is not a folder (the published architecture configs: configs/)")])
    return opts


def main(opts):
    """Runs every preset, prints its figures, and returns (results, problems) for the caller to judge."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = opts.tiny or device.type == "cpu"
    for name in opts.presets:  # refuse a bad name before building anything
        preset_args(name, opts.world_size, tiny, opts.mixed_precision)
    print(f"preflight on {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", world size {opts.world_size}: random weights, stand-in text embeddings and reward (real shapes)")
    if tiny:
        print("CPU figures: a tiny size of the same code, for checking it runs; run it on the GPU machine for the "
              "real memory and speed")
    if device.type == "cpu":  # tiny ops: more threads mostly wait on each other (6x slower on 2 shared cores)
        torch.set_num_threads(1)
    results, problems = [], []
    for name in opts.presets:
        r = short_epoch(name, opts, device, tiny)
        print(report(r, device, tiny))
        results.append(r)
        problems += [f"{name}: {p}" for p in checks(r)]
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next preset builds its own models
    first = results[0]
    for r in results[1:]:
        print(f"projected epoch time {r['name']} / {first['name']}: "
              f"{r['projected']['total'] / first['projected']['total']:.3f}x "
              "(paper, FLOPs: sd35-baseline / sd35 1.26x, sd35-baseline / sd35-flash 1.41x)")
    for p in problems:
        print(f"FAIL {p}")
    print("preflight: " + ("all checks passed" if not problems else f"{len(problems)} check(s) failed"))
    return results, problems


if __name__ == "__main__":
    try:
        sys.exit(1 if main(parse_args())[1] else 0)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
