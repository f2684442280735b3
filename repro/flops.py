"""Compute accounting: the paper's Table 4 (FLOPs per epoch) for run.sh's presets, and per-call FLOPs.

torch counts the FLOPs of ONE real call of each kind (one trajectory or one image) through progrpo.py's own
functions; the epoch's counts multiply them. A batch's FLOPs are linear in its size, so counts x per-call is
exact. A multiply-add is 2 FLOPs (torch's convention). `python -m repro.flops [config folder]` (or
`bash run.sh flops`) prints the table for SD3.5-M, SD-v1.4 and FLUX.1-dev built on the meta device from configs/:
no weights, no GPU, seconds.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from progrpo import (Args, RunError, decode, denoiser, latent_shape, live_counts, parse_prune_schedule, predict,
                     trainable_parameters)
from repro.scorers import clip_cosine, clip_preprocess

FLOPS_PRESETS = {  # run.sh's presets: model family and the flags that change the counts (sd14: B = 4, one GPU)
    "sd35": ("flow", dict(group_size=48, prune="5:24,7:12")),
    "sd35-flash": ("flow", dict(group_size=24, prune="5:16,7:12")),
    "sd35-baseline": ("flow", dict(group_size=24, prune="none")),
    "sd14": ("ddim", dict(group_size=48, prune="30:32,40:8", num_steps=50, prompts_per_epoch=4, beta=0.0,
                          full_finetune=True)),
    "sd14-baseline": ("ddim", dict(group_size=16, prune="none", num_steps=50, prompts_per_epoch=4, beta=0.0,
                                   full_finetune=True)),
    "flux": ("flux", dict(group_size=48, prune="3:24,4:12", num_steps=6, beta=0.0, rank=64, lora_alpha=128)),
    "flux-baseline": ("flux", dict(group_size=24, prune="none", num_steps=6, beta=0.0, rank=64, lora_alpha=128,
                                   global_std=True)),
}
# Table 4, per epoch: sampling + update
PAPER_TFLOPS = {"sd35-baseline": 453_474, "sd35": 335_627, "sd35-flash": 267_366}
PAPER_DECODE_TFLOPS, PAPER_REWARD_TFLOPS = 2.49, 0.34  # Table 4, per image


def count_flops(fn, *args, **kwargs):
    """(fn(*args, **kwargs), the FLOPs it ran): matmuls, convolutions and attention, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    # torch's counter has formulas for the GPU attention kernels but not the CPU one, which would count 0
    aten = torch.ops.aten
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu:
                         lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
                     aten._scaled_dot_product_flash_attention_for_cpu_backward:
                         lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


def call_flops(pipe, reward_fn, text, prompt, args):
    """FLOPs of one call of each kind for ONE trajectory or image, through this file's own functions.

    model: a guided evaluation (predict: the CFG pair, batch 2); train: the same with grad, and its backward
    into the trainable weights (the update, per trajectory-step); reference: the guided forward with the
    LoRA adapter off (the KL's base model); decode: one latent; reward: one image. `text` holds `prompt`
    in row 0. Real or meta-device models (meta_pipeline): only shapes matter, so any timestep will do.
    """
    model = denoiser(pipe)
    device = model.device
    x = torch.randn(1, *latent_shape(pipe, args.resolution), device=device)
    sched = dict(timesteps=torch.full((1,), 500.0, device=device))  # FLOPs do not depend on the timestep
    step, row = torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device)
    args = dataclasses.replace(args, mixed_precision="no")  # nor on the dtype (and meta tensors take no autocast)

    def guided():
        return predict(pipe, sched, step, x, text, row, args, 1)

    flops = {}
    with torch.no_grad():
        flops["model"] = flops["reference"] = count_flops(guided)[1]
        if getattr(model, "_hf_peft_config_loaded", False):  # LoRA: the reference skips the adapter's matmuls
            model.disable_adapters()
            flops["reference"] = count_flops(guided)[1]
            model.enable_adapters()
        images, flops["decode"] = count_flops(decode, pipe, x)
        flops["reward"] = count_flops(reward_fn, images, [prompt])[1]
    # autograd.grad, not backward(): the same graph and FLOPs, but no .grad left on the weights. Frozen
    # weights need no weight gradient, so with LoRA the backward costs ~1 forward instead of 2
    params = [p for p in model.parameters() if p.requires_grad]
    flops["train"] = count_flops(lambda: torch.autograd.grad(guided().square().mean(), params))[1]
    return flops


def epoch_flops(per_call, args, schedule):
    """FLOPs of one epoch (B = args.prompts_per_epoch groups): the schedule's counts x call_flops' per-call FLOPs.

    sampling: NFE model calls per group; checkpoints: a decode and a reward call per live trajectory at each
    checkpoint (the projection reuses the model output); final: the same for every trajectory reaching the
    end; update: K trajectories x int(T * timestep_fraction) steps x (train + reference when beta > 0).
    """
    alive = live_counts(args.num_steps, args.group_size, schedule)
    final = schedule[-1][1] if schedule else args.group_size  # trajectories that reach the end
    trained = args.ovf_after_sampling or args.uniform_after_sampling or final  # scores the whole group, trains K'
    image = per_call["decode"] + per_call["reward"]
    step = per_call["train"] + (per_call["reference"] if args.beta > 0 else 0)
    B = args.prompts_per_epoch
    out = dict(nfe=sum(alive), sampling=B * sum(alive) * per_call["model"],
               checkpoints=B * sum(alive[s] for s, _ in schedule) * image, final=B * final * image,
               update=B * trained * int(args.num_steps * args.timestep_fraction) * step)
    out["total"] = out["sampling"] + out["checkpoints"] + out["final"] + out["update"]
    return out


def clip_reward(clip):
    """ClipScore's computation (PickScore) on a CLIP model, with token ids in place of a tokenizer: the reward
    of the meta-device models. HPSv2.1 is open_clip's ViT-H-14, the same architecture."""
    def reward_fn(images, prompts):
        size = clip.config.vision_config.image_size  # any mean and std cost the same
        pixels = clip_preprocess(images, size, (0.5,) * 3, (0.5,) * 3)  # (N, 3, 224, 224)
        ids = torch.zeros(len(prompts), clip.config.text_config.max_position_embeddings, dtype=torch.long,
                          device=images.device)
        return clip.logit_scale.exp() * clip_cosine(clip, pixels, dict(input_ids=ids))
    return reward_fn


def meta_pipeline(config_dir, kind, args):
    """The paper's models on the meta device, from their published configs: real shapes, no weights, no download.

    kind 'flow': SD3.5-Medium (transformer, VAE, CLIP-L + CLIP-G + T5-XXL); 'ddim': SD-v1.4 (UNet, VAE, CLIP-L);
    'flux': FLUX.1-dev (transformer, VAE, CLIP-L + T5-XXL). Returns (pipe, clip, text, text_flops): the reward's
    CLIP-H, zero text embeddings of the shapes the encoders give (a prompt row and, for CFG, the negative row, as
    encode_prompts lays them out), and the FLOPs of one prompt through the text encoders.
    """
    from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              T5Config, T5EncoderModel)

    def read(name):
        path = Path(config_dir) / name
        if not path.is_file():
            raise RunError(f"architecture config '{path}' not found; give the folder of the published model configs")
        return json.loads(path.read_text())

    with torch.device("meta"):  # weights get shapes but no memory, and every op computes only shapes
        clip = CLIPModel(CLIPConfig(**read("pickscore_clip.json")))
        if kind == "flow":
            enc = read("sd35m_text_encoders.json")
            pipe = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel.from_config(read("sd35m_transformer.json")),
                vae=AutoencoderKL.from_config(read("sd35m_vae.json")),
                scheduler=FlowMatchEulerDiscreteScheduler.from_config(read("sd35m_scheduler.json")),
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**enc["clip_l"])), tokenizer=None,
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**enc["clip_g"])), tokenizer_2=None,
                text_encoder_3=T5EncoderModel(T5Config(**enc["t5"])), tokenizer_3=None)
            encoders = [(pipe.text_encoder, 77), (pipe.text_encoder_2, 77),
                        (pipe.text_encoder_3, args.max_sequence_length)]
            # SD3 joins 77 CLIP tokens (L and G side by side, zero-padded to 4096) with the T5 tokens
            embeds = torch.zeros(1, 77 + args.max_sequence_length, pipe.transformer.config.joint_attention_dim)
            pooled = torch.zeros(1, pipe.transformer.config.pooled_projection_dim)  # CLIP-L + CLIP-G pooled
            text = dict(embeds=embeds, pooled=pooled, negative=dict(embeds=embeds, pooled=pooled))  # prompt, negative
        elif kind == "flux":
            enc = read("flux1dev_text_encoders.json")
            pipe = FluxPipeline(
                transformer=FluxTransformer2DModel.from_config(read("flux1dev_transformer.json")),
                vae=AutoencoderKL.from_config(read("flux1dev_vae.json")),
                scheduler=FlowMatchEulerDiscreteScheduler.from_config(read("flux1dev_scheduler.json")),
                text_encoder=CLIPTextModel(CLIPTextConfig(**enc["clip_l"])), tokenizer=None,
                text_encoder_2=T5EncoderModel(T5Config(**enc["t5"])), tokenizer_2=None)
            encoders = [(pipe.text_encoder, 77), (pipe.text_encoder_2, args.max_sequence_length)]
            config = pipe.transformer.config  # the T5 tokens and CLIP-L's pooled output; no negative prompt
            text = dict(embeds=torch.zeros(1, args.max_sequence_length, config.joint_attention_dim),
                        pooled=torch.zeros(1, config.pooled_projection_dim))
        else:
            pipe = StableDiffusionPipeline(
                unet=UNet2DConditionModel.from_config(read("sd14_unet.json")),
                vae=AutoencoderKL.from_config(read("sd14_vae.json")),
                scheduler=DDIMScheduler.from_config(read("sd14_scheduler.json")), tokenizer=None,
                text_encoder=CLIPTextModel(CLIPTextConfig(**read("sd14_text_encoder.json"))),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            encoders = [(pipe.text_encoder, 77)]
            embeds = torch.zeros(1, 77, pipe.unet.config.cross_attention_dim)
            text = dict(embeds=embeds, negative=dict(embeds=embeds))  # the prompt's row, the negative's
        text_flops = sum(count_flops(encoder, torch.zeros(1, n, dtype=torch.long))[1] for encoder, n in encoders)
    return pipe, clip, text, text_flops


def preset_flops(config_dir):
    """{preset: epoch_flops(...) plus per_call, args, schedule, params (the frozen denoiser's), image_tokens,
    text_flops (one prompt through the text encoders), text (their FLOPs per epoch, not in the totals)}."""
    families, results = {}, {}
    for name, (kind, flags) in FLOPS_PRESETS.items():
        args = Args(**flags)
        if kind not in families:  # a family's presets share every shape: one set of calls serves them all
            pipe, clip, text, text_flops = meta_pipeline(config_dir, kind, args)
            model = denoiser(pipe)
            params = sum(p.numel() for p in model.parameters())  # before LoRA joins them
            with torch.device("meta"):
                trainable_parameters(pipe, args)  # LoRA (its matmuls count) or the whole UNet (--full_finetune)
            per_call = call_flops(pipe, clip_reward(clip), text, "", args)
            # the reward's image tower alone, as the paper's per-image figure seems to count it
            side = clip.config.vision_config.image_size
            pixels = torch.zeros(1, 3, side, side, device="meta")
            per_call["reward_image"] = count_flops(clip.get_image_features, pixel_values=pixels)[1]
            shape = latent_shape(pipe, args.resolution)  # (C, h, w), or FLUX's packed (tokens, C)
            tokens = shape[0] if len(shape) == 2 else (shape[1] // getattr(model.config, "patch_size", 1)) ** 2
            families[kind] = dict(per_call=per_call, params=params, image_tokens=tokens, text_flops=text_flops,
                                  prompt_copies=2 if "negative" in text else 1)
        shared = families[kind]
        schedule = parse_prune_schedule(args.prune, args.num_steps, args.group_size)
        # every epoch encodes its B prompts, and for CFG B empty negatives (diffusers encodes one per prompt)
        results[name] = dict(epoch_flops(shared["per_call"], args, schedule), args=args, schedule=schedule,
                             text=shared["prompt_copies"] * args.prompts_per_epoch * shared["text_flops"], **shared)
    return results


def accounting_variants(results):
    """{label: {sd35 preset: total FLOPs per epoch}} under other accounting choices, each a change of per-call
    FLOPs or of flags put through the same epoch_flops. The paper's Table 4 says which it made for none of them."""
    pc, r35 = results["sd35"]["per_call"], results["sd35"]
    full = {**pc, "train": 3 * pc["model"]}  # backward = 2 forwards: a weight gradient for every weight
    rule = 2 * 2 * r35["params"] * r35["image_tokens"]  # CFG pair x 2 FLOPs x N parameters x image tokens
    variants = [  # (label, per-call FLOPs, flags changed)
        ("ours, measured: CFG pair and reference forward in the update, LoRA backward", pc, {}),
        ("without CFG in the update", {**pc, "train": pc["train"] / 2, "reference": pc["reference"] / 2}, {}),
        ("without the reference forward", pc, dict(beta=0.0)),
        ("update = 3 forwards (full backward, the 6N rule) + reference", full, {}),
        (f"3 forwards + reference, all {r35['args'].num_steps} steps trained", full, dict(timestep_fraction=1.0)),
        ("3 forwards + reference, decode and reward left out", {**full, "decode": 0, "reward": 0}, {}),
        (f"3 forwards + reference, a forward by the 2N rule: 2 FLOPs x N = {r35['params'] / 1e9:.2f}B parameters "
         f"x {r35['image_tokens']} image tokens", {**pc, "model": rule, "train": 3 * rule, "reference": rule}, {})]
    return {label: {n: epoch_flops(per_call, dataclasses.replace(results[n]["args"], **flags),
                                   results[n]["schedule"])["total"]
                    for n in PAPER_TFLOPS} for label, per_call, flags in variants}


def flops_table(results):
    """Markdown report of preset_flops' results: per-epoch TFLOPs beside the paper's Table 4, and the accounting
    choices that explain the difference, computed."""
    TERA, pc, pc14, paper = 1e12, results["sd35"]["per_call"], results["sd14"]["per_call"], PAPER_TFLOPS
    pcf = results["flux"]["per_call"]
    table4 = {n: p * TERA for n, p in paper.items()}  # in FLOPs, like ours

    def speedups(tot):  # the baseline's FLOPs over Pro-GRPO's and over Flash's
        return f"{tot['sd35-baseline'] / tot['sd35']:.2f}x / {tot['sd35-baseline'] / tot['sd35-flash']:.2f}x"

    lines = ["## FLOPs per epoch (TFLOPs), torch.utils.flop_counter on SD3.5-Medium, SD-v1.4 and FLUX.1-dev built "
             "on the meta device", "",
             f"Per call: SD3.5-M guided evaluation (CFG pair, 512 px, 77 + 128 text tokens) {pc['model'] / TERA:.2f}, "
             f"its train step (+ LoRA backward) {pc['train'] / TERA:.2f}, reference forward "
             f"{pc['reference'] / TERA:.2f}; SD-v1.4 guided evaluation {pc14['model'] / TERA:.2f}, train step "
             f"(full fine-tune) {pc14['train'] / TERA:.2f}; FLUX.1-dev guided evaluation (distilled guidance: one "
             f"call, 1024 image + 128 text tokens) {pcf['model'] / TERA:.2f}, train step (+ LoRA r 64 backward) "
             f"{pcf['train'] / TERA:.2f}. Per image: VAE decode {pc['decode'] / TERA:.2f} (paper "
             f"{PAPER_DECODE_TFLOPS}); reward {pc['reward'] / TERA:.3f} (CLIP-H image + text towers as ClipScore "
             f"runs them; the image tower alone {pc['reward_image'] / TERA:.3f}, paper {PAPER_REWARD_TFLOPS}).", "",
             "| preset | G -> K | NFE / group | sampling | checkpoint decode + reward | final decode + reward | update "
             "| total | paper Table 4 | ours / paper |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        kept = r["schedule"][-1][1] if r["schedule"] else r["args"].group_size
        cells = [name, f"{r['args'].group_size} -> {kept}", r["nfe"]]
        cells += [f"{r[k] / TERA:,.0f}" for k in ("sampling", "checkpoints", "final", "update", "total")]
        cells += [f"{paper[name]:,}", f"{r['total'] / TERA / paper[name]:.2f}"] if name in paper else ["-", "-"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    total = {n: r["total"] for n, r in results.items()}
    lines += ["", f"Speed-up over the baseline, sd35 / sd35-flash: {speedups(total)} (paper: 1.26x / 1.41x in its "
                  f"text, {speedups(paper)} from Table 4); sd14: {total['sd14-baseline'] / total['sd14']:.2f}x, "
                  f"flux: {total['flux-baseline'] / total['flux']:.2f}x (no paper figures). "
                  f"Left out: the text encoders, run per prompt ({results['sd35']['text'] / TERA:,.0f} TFLOPs an "
                  f"sd35 epoch, {results['sd35']['text'] / total['sd35']:.2%}). sd14: B = 4 prompts (run.sh's "
                  f"per-GPU share), HPSv2.1 counted as the PickScore CLIP-H (both ViT-H-14).",
              "", "### Why ours differs from Table 4 (sd35 presets, TFLOPs per epoch, ours / paper in brackets)", "",
              "| accounting | sd35-baseline | sd35 | sd35-flash | speed-ups |", "|---|---|---|---|---|"]
    variants = accounting_variants(results)
    for label, v in [*variants.items(), ("paper Table 4", table4)]:
        cells = [f"{v[n] / TERA:,.0f} ({v[n] / table4[n]:.2f})" for n in paper]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {speedups(v)} |")
    # the closest accounting, by the totals and by the speed-ups (which a constant factor per model call leaves alone)
    gaps = {"totals": lambda v: max(abs(math.log(v[n] / table4[n])) for n in paper),
            "speed-ups": lambda v: max(abs(math.log(v[n] / v["sd35-baseline"] * table4["sd35-baseline"] / table4[n]))
                                       for n in ("sd35", "sd35-flash"))}
    lines.append("")
    for what, gap in gaps.items():  # the two closest: a near tie is worth seeing
        first, second = sorted(variants, key=lambda label: gap(variants[label]))[:2]
        lines.append(f"Closest to Table 4 in the {what}: '{first}' (within {math.exp(gap(variants[first])) - 1:.1%}), "
                     f"then '{second}' ({math.exp(gap(variants[second])) - 1:.1%}).")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        print(flops_table(preset_flops(sys.argv[1] if len(sys.argv) > 1 else "configs")))
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
