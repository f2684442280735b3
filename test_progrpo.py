"""Tests for progrpo.py: CPU only, offline, tiny random-weight models of the real classes.

Each test says in its docstring the one property it pins.
"""

import collections
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import progrpo
import repro.tiny as tiny_models
from repro import scorers

ROOT = Path(__file__).resolve().parent
REFERENCE = ROOT / "repro" / "reference" / "baseline_steps.pt"  # outputs of Flow-GRPO's and DDPO's own step code
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)  # train_epoch's loss scaler outside fp16: a pass-through


def rel_close(ours, ref, tol=1e-5):
    """DESIGN.md's parity tolerance: |ours - ref| <= tol (1 + |ref|), elementwise."""
    return bool(((ours - ref).abs() <= tol * (1 + ref.abs())).all())


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE)  # shipped in the repository: every clone runs the parity tests


# ---------------------------------------------------------------------------------------------------
# Step functions and projection
# ---------------------------------------------------------------------------------------------------

def test_sde_step_matches_flow_grpo_reference(reference):
    """sde_step_with_logprob reproduces Flow-GRPO's own outputs (log-prob, mean, std) on every flow case."""
    for case in reference["flow"]:
        prev, logp, mean, std = progrpo.sde_step_with_logprob(
            case["model_output"], case["sample"], case["sigma"], case["sigma_next"], case["noise_level"],
            prev_sample=case["prev_sample"])
        assert rel_close(logp, case["log_prob"]), case["step_index"]
        assert rel_close(mean, case["prev_sample_mean"]), case["step_index"]
        assert rel_close(std, case["std_dev_t"]), case["step_index"]
        assert torch.equal(prev, case["prev_sample"])


def test_flow_schedule_matches_reference_sigmas(reference):
    """Our SD3.5 schedule (diffusers, shift 3, T=10) gives the sigmas and timesteps the reference used."""
    sched = progrpo.sampler_schedule(tiny_models.build_tiny_pipeline("flow"), 10, 16, "cpu")
    assert rel_close(torch.cat([sched["sigma"], sched["sigma_next"][-1:]]), reference["flow_sigmas"])
    assert rel_close(sched["timesteps"], reference["flow_timesteps"])


def test_noise_level_zero_is_the_euler_step():
    """a = 0 gives x + v dt exactly and no log-prob."""
    v, x = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.9, 0.4, 0.0])
    prev, logp, mean, std = progrpo.sde_step_with_logprob(v, x, sigma, sigma_next, 0.0)
    assert logp is None and torch.equal(std, torch.zeros(3))
    assert torch.allclose(prev, x + v * (sigma_next - sigma).view(-1, 1, 1, 1), atol=1e-6)


def test_logprob_is_mean_of_normal_log_density():
    """The log-prob equals torch.distributions.Normal(mean, std sqrt(-dt)).log_prob averaged over C*H*W."""
    v, x = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    sigma, sigma_next = torch.tensor([0.8, 0.5]), torch.tensor([0.7, 0.3])
    prev, logp, mean, std = progrpo.sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, noise=torch.randn(2, 4, 6, 6))
    scale = (std * (sigma - sigma_next).sqrt()).view(-1, 1, 1, 1)
    expected = torch.distributions.Normal(mean, scale).log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(logp, expected, rtol=1e-6, atol=1e-6)


# Gaussian data x0 ~ N(M, S^2): x_sigma = (1 - sigma) x0 + sigma eps is jointly Gaussian with x0 and eps,
# so the optimal velocity E[eps - x0 | x_sigma] and E[x0 | x_sigma] are known in closed form.
M, S = 0.7, 0.5


def gaussian_posterior(x, sigma):
    var = (1 - sigma) ** 2 * S**2 + sigma**2
    e_x0 = M + (1 - sigma) * S**2 / var * (x - (1 - sigma) * M)
    e_eps = sigma / var * (x - (1 - sigma) * M)
    return e_eps - e_x0, e_x0  # v*, E[x0 | x]


def test_projection_is_posterior_mean_for_gaussian_data():
    """project_x0 (flow) with the closed-form velocity v* at sigma equals E[x0 | x_sigma]."""
    x = torch.randn(64, 1, 2, 2) * 1.3
    for sigma in (0.9, 0.5, 0.1):
        v, e_x0 = gaussian_posterior(x, sigma)
        x0_hat = progrpo.project_x0(dict(sigma=torch.full((64,), sigma)), torch.arange(64), x, v)
        assert torch.allclose(x0_hat, e_x0, atol=1e-5)


def test_sde_sampler_recovers_gaussian_data():
    """Driven by the exact velocity, the Flow-GRPO SDE sampler ends at mean M and std S (200 steps, 40k samples)."""
    sched = progrpo.sampler_schedule(tiny_models.build_tiny_pipeline("flow"), 200, 16, "cpu")
    sigmas = torch.cat([sched["sigma"], sched["sigma_next"][-1:]])
    g = torch.Generator().manual_seed(0)
    n = 40_000
    x = torch.randn(n, 1, 1, 1, generator=g)
    for i in range(200):
        v, _ = gaussian_posterior(x, sigmas[i])
        x = progrpo.sde_step_with_logprob(v, x, sigmas[i].expand(n), sigmas[i + 1].expand(n), 0.7,
                                          noise=torch.randn(x.shape, generator=g))[0]
    # sampling error of the mean is S / sqrt(n) = 0.0025; 10 steps instead of 200 would end at std ~0.42
    assert abs(x.mean().item() - M) < 0.01
    assert abs(x.std().item() - S) < 0.01


def test_ddim_step_matches_ddpo_reference(reference):
    """ddim_step_with_logprob and project_x0 (eps) reproduce DDPO's outputs on every ddim case."""
    for case in reference["ddim"]:
        prev, logp, mean, std = progrpo.ddim_step_with_logprob(
            case["model_output"], case["sample"], case["alpha_prod_t"], case["alpha_prod_t_prev"], case["eta"],
            prev_sample=case["prev_sample"])
        rows = torch.arange(len(case["sample"]))
        x0 = progrpo.project_x0(dict(alpha_prod_t=case["alpha_prod_t"]), rows, case["sample"], case["model_output"])
        assert rel_close(logp, case["log_prob"]) and rel_close(std, case["std_dev_t"]), case["step_index"]
        assert rel_close(x0, case["pred_original_sample"]), case["step_index"]


def test_ddim_schedule_matches_reference(reference):
    """SD-v1.4's DDIM schedule at T=50: timesteps 981..1 and the alphas (prev_t clamped at 0) of each case."""
    sched = progrpo.sampler_schedule(tiny_models.build_tiny_pipeline("ddim"), 50, 16, "cpu")
    assert torch.equal(sched["timesteps"], reference["ddim_timesteps"])
    for case in reference["ddim"]:
        i = case["step_index"]
        assert (rel_close(sched["alpha_prod_t"][i], case["alpha_prod_t"][0])
                and rel_close(sched["alpha_prod_t_prev"][i], case["alpha_prod_t_prev"][0]))


def test_ddim_eta_zero_is_diffusers_deterministic_ddim():
    """eta = 0 gives no log-prob and, over all 50 steps, the same samples as diffusers' DDIMScheduler.step."""
    pipe = tiny_models.build_tiny_pipeline("ddim")
    sched = progrpo.sampler_schedule(pipe, 50, 16, "cpu")
    g = torch.Generator().manual_seed(0)
    x = ours = torch.randn(2, 4, 3, 3, generator=g)
    for i, t in enumerate(sched["timesteps"]):
        eps = torch.randn(2, 4, 3, 3, generator=g)
        ours, logp, _, _ = progrpo.sampler_step(sched, torch.full((2,), i), eps, ours, 0.0)
        x = pipe.scheduler.step(eps, t, x, eta=0.0).prev_sample
        assert logp is None and torch.allclose(ours, x, rtol=1e-5, atol=1e-5), i


def test_v_prediction_matches_diffusers_ddim():
    """SD2.x-style v-prediction: the step (eta 0, 50 steps) and the projection equal diffusers' DDIMScheduler with
    prediction_type="v_prediction" (the family's output, sd_cfg, turns the UNet's v into eps once)."""
    from diffusers import DDIMScheduler

    pipe = tiny_models.build_tiny_pipeline("ddim")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    sched = progrpo.sampler_schedule(pipe, 50, 16, "cpu")
    g = torch.Generator().manual_seed(0)
    x = ours = torch.randn(2, 4, 3, 3, generator=g)
    drawn = SimpleNamespace()  # the v drawn for this step: what the stand-in UNet predicts, whatever its input
    stand_in = SimpleNamespace(unet=lambda x, timestep, encoder_hidden_states, return_dict: (drawn.v,),
                               scheduler=pipe.scheduler)
    for i, t in enumerate(sched["timesteps"]):
        drawn.v = v = torch.randn(2, 4, 3, 3, generator=g)
        steps = torch.full((2,), i)
        no_text = dict(embeds=torch.zeros(2, 1, 1))
        eps = progrpo.sd_cfg(stand_in, ours, sched["timesteps"][steps], no_text, torch.arange(2), 1.0)
        x0_hat = progrpo.project_x0(sched, steps, ours, eps)
        ours = progrpo.sampler_step(sched, steps, eps, ours, 0.0)[0]
        result = pipe.scheduler.step(v, t, x, eta=0.0)
        x = result.prev_sample
        assert torch.allclose(x0_hat, result.pred_original_sample, rtol=1e-4, atol=1e-4), i
        assert torch.allclose(ours, x, rtol=1e-4, atol=1e-4), i


def test_ddim_projection_inverts_forward_noising():
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps, projected with the true eps, gives back x0."""
    x0, eps, a = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.tensor([0.99, 0.5, 0.05])
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(progrpo.project_x0(dict(alpha_prod_t=a), torch.arange(3), x_t, eps), x0, atol=1e-5)


def test_ddim_sampler_recovers_gaussian_data():
    """Driven by the exact eps for Gaussian data, DDIM (eta 1, 500 steps) ends at the law of x at t = 0."""
    pipe = tiny_models.build_tiny_pipeline("ddim")
    sched = progrpo.sampler_schedule(pipe, 500, 16, "cpu")
    g, n = torch.Generator().manual_seed(0), 40_000
    x = torch.randn(n, 1, 1, 1, generator=g)
    for i in range(500):
        a = sched["alpha_prod_t"][i]
        eps = (1 - a).sqrt() / (a * S**2 + 1 - a) * (x - a.sqrt() * M)  # E[eps | x_t]
        x = progrpo.sampler_step(sched, torch.full((n,), i), eps, x, 1.0, noise=torch.randn(x.shape, generator=g))[0]
    a0 = pipe.scheduler.alphas_cumprod[0]  # the last step ends at t = 0, not at clean data (DDPO)
    assert abs(x.mean().item() - a0.sqrt().item() * M) < 0.01
    assert abs(x.std().item() - (a0 * S**2 + 1 - a0).sqrt().item()) < 0.01  # 50 steps would end ~10% low


# ---------------------------------------------------------------------------------------------------
# OVF, advantages, schedule
# ---------------------------------------------------------------------------------------------------

def test_ovf_matches_brute_force():
    """ovf_select attains the maximum variance over all k-subsets, on random groups with and without ties."""
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(3, 11, (1,), generator=g))
        k = int(torch.randint(2, n, (1,), generator=g))
        rewards = torch.randint(0, 4, (n,), generator=g).double() if trial % 2 else torch.randn(n, generator=g).double()
        kept = progrpo.ovf_select(rewards, k)
        assert len(kept) == k and len(set(kept.tolist())) == k
        best = max(rewards[list(c)].var(correction=0).item() for c in itertools.combinations(range(n), k))
        assert rewards[kept].var(correction=0).item() >= best - 1e-12 * max(1.0, best)
        assert torch.equal(kept, progrpo.ovf_select(rewards.clone(), k))  # deterministic


def test_ovf_tie_rule():
    """Equal rewards: the tie rule keeps the j lowest and k - j highest with j closest to k / 2."""
    assert progrpo.ovf_select(torch.zeros(6), 4).tolist() == [0, 1, 4, 5]
    assert progrpo.ovf_select(torch.tensor([0.0, 5.0, 1.0, 4.0, 2.0, 3.0]), 2).tolist() == [0, 1]


def test_group_advantages_known_answer():
    """Per-group (R - mean) / (std + 1e-4), population std, clip, and the Flow-GRPO global-std variant."""
    r = torch.tensor([1.0, 3.0, 10.0, 10.0, 0.0, 4.0])
    ids = torch.tensor([7, 7, 2, 2, 5, 5])
    adv = progrpo.group_advantages(r, ids)
    assert torch.allclose(adv, torch.tensor([-1, 1, 0, 0, -1, 1]) / (1 + 1e-4 / torch.tensor([1, 1, 1, 1, 2, 2])),
                          atol=1e-6)
    global_adv = progrpo.group_advantages(r, ids, global_std=True)
    assert torch.allclose(global_adv, torch.tensor([-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]) / (r.std(correction=0) + 1e-4),
                          atol=1e-6)
    assert progrpo.group_advantages(torch.tensor([0.0, 0, 0, 100]), torch.zeros(4), clip=1.5).max().item() == 1.5


@pytest.mark.parametrize("global_std", [False, True])
def test_zero_variance_group_gives_zero_advantages(global_std):
    """A group whose rewards are all equal gets advantages exactly 0, never NaN; under a global std too, where the
    round-off of its fp32 mean (7 x 22.37 / 7 is not 22.37) would give |A| ~1e-5 and keep it in the update."""
    rewards = torch.tensor([0.3, 0.3, 0.3, 1.0, 2.0] + [22.37] * 7)
    adv = progrpo.group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1] + [2] * 7), global_std=global_std)
    assert torch.isfinite(adv).all() and torch.equal(adv[:3], torch.zeros(3)) and torch.equal(adv[5:], torch.zeros(7))


def test_prune_schedule_and_nfe_formula():
    """The schedule parses and live counts give DESIGN.md's NFE per group: 360, 200, 1880 (dense 480, 240)."""
    assert progrpo.parse_prune_schedule("5:24,7:12", 10, 48) == [(5, 24), (7, 12)]
    assert sum(progrpo.live_counts(10, 48, [(5, 24), (7, 12)])) == 360
    assert sum(progrpo.live_counts(10, 24, [(5, 16), (7, 12)])) == 200
    assert sum(progrpo.live_counts(50, 48, [(30, 32), (40, 8)])) == 1880
    assert sum(progrpo.live_counts(10, 48, [])) == 480 and progrpo.parse_prune_schedule("none", 10, 24) == []


@pytest.mark.parametrize("spec, group, message", [
    ("7:24,5:12", 48, "strictly increasing"),
    ("0:24", 48, "inside (0, 10)"),
    ("10:24", 48, "inside (0, 10)"),
    ("5:24,7:24", 48, "strictly decrease"),
    ("5:48", 48, "strictly decrease"),
    ("5:1", 48, "at least 2"),
    ("5-24", 48, "step:survivors"),
    ("none", 1, "at least 2"),
])
def test_bad_schedules_are_rejected(spec, group, message):
    """Each malformed schedule gives a ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        progrpo.parse_prune_schedule(spec, 10, group)


# ---------------------------------------------------------------------------------------------------
# Parity with progrpo_kernels/: progrpo.py's own torch path and the kernels' references compute the same numbers
# ---------------------------------------------------------------------------------------------------

def test_step_logprob_torch_equals_the_kernels_reference():
    """progrpo.step_logprob_torch (the path without kernels/) gives kernels' reference log_prob and KL, flow
    (including a sigma == 1 first step) and DDIM, to fp32 round-off."""
    from progrpo_kernels import ddim_logprob, sde_logprob

    gen = torch.Generator().manual_seed(3)
    v, x, x_next, v_ref = (torch.randn(3, 4, 6, 6, generator=gen) for _ in range(4))
    sigma, sigma_next = torch.tensor([1.0, 0.79037, 0.27805]), torch.tensor([0.96013, 0.70728, 0.00893])
    rows = torch.arange(3)
    ours = progrpo.step_logprob_torch(dict(sigma=sigma, sigma_next=sigma_next), rows, v, x, x_next, 0.7, v_ref)
    ref = sde_logprob(v, x, x_next, sigma, sigma_next, progrpo.flow_std(sigma, sigma_next, 0.7), v_ref=v_ref,
                      backend="torch")
    a_t, a_prev = torch.tensor([0.0047, 0.3, 0.9]), torch.tensor([0.0058, 0.33, 0.99])
    ours_ddim = progrpo.step_logprob_torch(dict(alpha_prod_t=a_t, alpha_prod_t_prev=a_prev), rows, v, x, x_next,
                                           1.0, v_ref)
    ref_ddim = ddim_logprob(v, x, x_next, a_t, a_prev, 1.0, eps_ref=v_ref, backend="torch")
    for a, b in zip(ours + ours_ddim, ref + ref_ddim):
        assert rel_close(a, b)


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_equal_the_kernels_reference(global_std):
    """progrpo.group_advantages equals kernels' reference (random groups, a singleton, a constant group of 7)."""
    from progrpo_kernels import group_advantages_torch
    from progrpo_kernels.advantages import ADV_ATOL

    gen = torch.Generator().manual_seed(9)
    ids = torch.tensor([5, 5, 5, 5, -2, 9, 9, 9, 9, 9, 9] + [0] * 7)[torch.randperm(18, generator=gen)]
    rewards = torch.randn(18, generator=gen)
    rewards[ids == 0] = 22.37  # constant, but its fp32 mean 7 * 22.37 / 7 is not 22.37: adv must still be 0
    expected = progrpo.group_advantages(rewards, ids, eps=1e-4, clip=5.0, global_std=global_std)
    torch.testing.assert_close(group_advantages_torch(rewards, ids, global_std=global_std), expected,
                               rtol=0, atol=ADV_ATOL)


# ---------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------

def test_colour_reward_and_weighted_sum():
    """The demo reward prefers the prompt's colour; a weighted sum adds terms with their weights."""
    red, blue = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    red[:, 0], blue[:, 2] = 1.0, 1.0
    images, prompts = torch.cat([red, blue]), ["a red car", "a red car"]
    assert tiny_models.colour_reward(images, prompts).tolist() == [1.0, -0.5]
    mixed = progrpo.build_reward("repro.tiny.Colour:2.0,repro.scorers.JpegCompressibility:0.5", "cpu")(images, prompts)
    colour, jpeg = tiny_models.colour_reward(images, prompts), -scorers.jpeg_size_kb(images)
    assert mixed.shape == (2, 3) and torch.allclose(mixed[:, 0], 2 * colour + 0.5 * jpeg)  # the sum, then each term
    assert torch.equal(mixed[:, 1], colour) and torch.equal(mixed[:, 2], jpeg)


def test_jpeg_compressibility_prefers_flat_images():
    """A flat image compresses better (higher compressibility reward) than noise."""
    flat, noise = torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    r = scorers.JpegCompressibility("cpu")(torch.cat([flat, noise]), ["", ""])
    assert r[0] > r[1] and torch.equal(scorers.JpegIncompressibility("cpu")(torch.cat([flat, noise]), ["", ""]), -r)


def test_pickscore_loads_from_folder_and_scores(tmp_path):
    """PickScore's real loading code runs on a tiny random CLIP saved to a folder; score = scale * cos."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_models._tiny_tokenizers()[0]
    text = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=len(tok),
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=224,
                  patch_size=32)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(tmp_path)
    config = dict(crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True, resample=3, size=224,
                  # PickScore's
                  image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    CLIPProcessor(image_processor=CLIPImageProcessor(**config), tokenizer=tok).save_pretrained(tmp_path)
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    prompts = ["a red car", "a cat", "two dogs"]
    pickscore = scorers.PickScore("cpu", model=str(tmp_path), processor=str(tmp_path))
    clipscore = scorers.CLIPScore("cpu", model=str(tmp_path), processor=str(tmp_path))
    scores, cos = pickscore(images, prompts), clipscore(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # the same score from CLIPModel's own forward on our preprocessed pixels and the processor's tokens
    # torchvision's rule: long side int(224 * 48 / 40) = 268, crop offset round(44 / 2) = 22
    pixels = torch.nn.functional.interpolate(images, size=(224, 268), mode="bicubic", antialias=True).clamp(0, 1)
    pixels = pixels[..., 22:246]
    mean, std = torch.tensor(config["image_mean"]).view(1, 3, 1, 1), torch.tensor(config["image_std"]).view(1, 3, 1, 1)
    tokens = pickscore.processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=77,
                                           return_tensors="pt")
    logits = pickscore.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                             pixel_values=(pixels - mean) / std).logits_per_image
    assert torch.allclose(scores, logits.diag(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(cos * pickscore.model.logit_scale.exp(), scores, rtol=1e-5)  # CLIP score: the plain cosine


# ---------------------------------------------------------------------------------------------------
# The tiny pipeline: sampling, pruning, update
# ---------------------------------------------------------------------------------------------------

def tiny_args(**overrides):
    base = dict(pretrained_model_name_or_path="", resolution=16, num_steps=6, group_size=6, prune="2:4,4:3",
                prompts_per_epoch=2, sample_batch_size=5, decode_batch_size=4, train_batch_size=4, guidance_scale=4.5,
                max_sequence_length=16, reward="repro.tiny.Colour", updates_per_epoch=1, clip_range=1e-4,
                beta=0.01, rank=4, lora_alpha=8)
    return progrpo.Args(**{**base, **overrides})


FAMILY_KINDS = ["flow", "ddim", "flux"]  # the tiny SD3, SD1.x and FLUX.1-dev folders save_tiny writes


@pytest.fixture(scope="module", params=FAMILY_KINDS)
def family_tiny(request, tiny_dir):
    """(kind, pipe, params, prompts, text): one family's tiny pipeline from its folder in fp32 with a rank-4 LoRA, two
    prompts and their conditioning; the same through the same code for every family (one per module and family)."""
    pipe = progrpo.load_pipeline(str(tiny_dir / request.param), torch.float32)
    params = progrpo.trainable_parameters(pipe, tiny_args())
    prompts = ["a red cat", "a blue dog"]
    return request.param, pipe, params, prompts, progrpo.encode_prompts(pipe, prompts, 16)


def test_tiny_pipeline_round_trips_through_from_pretrained(tiny_dir):
    """The tiny pipeline saved to a folder (the session's, by save_tiny) loads back through the real
    from_pretrained path, same outputs."""
    pipe = tiny_models.build_tiny_pipeline()
    loaded = progrpo.load_pipeline(str(tiny_dir / "flow"), torch.float32)
    args = tiny_args()
    out = [progrpo.sample_deterministic(p, progrpo.encode_prompts(p, ["a red cat"], 16), args, 4, seed=0)
           for p in (pipe, loaded)]
    assert torch.equal(out[0], out[1]) and out[0].std() > 0.05  # and the decoder really carries colour


def test_nfe_counts_every_transformer_call(tiny):
    """perf NFE equals the schedule's formula and the transformer really sees exactly that many trajectory-steps."""
    pipe, _, prompts, text = tiny
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[0] // 2),
                                                      with_kwargs=True)
    try:
        args = tiny_args()
        schedule = progrpo.parse_prune_schedule(args.prune, args.num_steps, args.group_size)
        samples, stats, audit = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 0, schedule)
    finally:
        hook.remove()
    expected = len(prompts) * sum(progrpo.live_counts(6, 6, schedule))  # 2 * (3*6 + 2*4 + 1*3) = 58
    assert stats["nfe"] == sum(seen) == expected == 58
    assert stats["decodes"] == 2 * (6 + 4) + 2 * 3  # checkpoints + final, each image scored once
    assert samples["latents"].shape == (6, 7, 4, 8, 8) and samples["log_probs"].shape == (6, 6)
    assert [len(a["survivors"]) for a in audit] == [3, 3]


def test_guidance_one_skips_the_unconditional_half(tiny):
    """At --guidance_scale 1 the denoiser sees only the trajectories' text rows (half the CFG batch), and the output
    equals the guided formula o_u + 1 (o_t - o_u) computed from the old call on both halves."""
    pipe, _, _, text = tiny
    sched = progrpo.sampler_schedule(pipe, 6, 16, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, steps, rows = torch.randn(5, 4, 8, 8, generator=g), torch.arange(5), torch.tensor([0, 1, 0, 1, 1])
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[0]), with_kwargs=True)
    with torch.no_grad():
        args = tiny_args(guidance_scale=1.0, mixed_precision="no")
        out = progrpo.predict(pipe, sched, steps, x, text, rows, args, 3)
        hook.remove()
        t = sched["timesteps"][steps]
        both = {k: torch.cat([text["negative"][k].expand(5, *v.shape[1:]), v[rows]]) for k, v in text.items()
                if k != "negative"}  # the empty prompt's rows, then the trajectories' prompts
        o_uncond, o_text = pipe.transformer(torch.cat([x, x]), timestep=torch.cat([t, t]), return_dict=False,
                                            encoder_hidden_states=both["embeds"],
                                            pooled_projections=both["pooled"])[0].float().chunk(2)
    assert seen == [3, 2]  # micro-batches of 3 and 2 trajectories, one row each (guided: 6 and 4)
    assert (o_text - o_uncond).abs().max() > 1e-2  # the two halves differ: dropping the wrong one would show
    torch.testing.assert_close(out, o_uncond + 1.0 * (o_text - o_uncond), rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_survivors_are_identical_to_unpruned_run(family_tiny, batch_size):
    """A survivor's latents, log-probs and reward equal the same member's in an unpruned run with the same seed, in
    every family (FLUX's latents packed into tokens).

    Bit for bit when each transformer call holds one trajectory; with mixed micro-batches the BLAS
    reduction order changes with the batch's other rows, so only float round-off (1e-6) may differ.
    """
    _, pipe, _, prompts, text = family_tiny
    args = tiny_args(sample_batch_size=batch_size, decode_batch_size=batch_size, reward_batch_size=batch_size)
    pruned, _, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 3, [(2, 4), (4, 3)])
    full, _, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward,
                                 dataclasses.replace(args, prune="none"), 3, [])
    rows = pruned["prompt_idx"] * args.group_size + pruned["member"]  # full run keeps every trajectory, in id order
    for key in ("latents", "log_probs", "rewards"):
        if batch_size == 1:
            assert torch.equal(pruned[key], full[key][rows]), key
        else:
            assert torch.allclose(pruned[key], full[key][rows], rtol=0, atol=1e-6), key


def test_shared_noise_starts_a_group_from_one_latent(tiny):
    """--shared_noise (DanceGRPO): every member of a group starts from one latent (member 0's own), groups from
    different ones, and the members part at the first step (their SDE noise differs); without it they start apart."""
    pipe, _, prompts, text = tiny
    args = tiny_args(prune="none", num_steps=2, shared_noise=True)
    shared, _, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 0, [])
    own, _, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward,
                                dataclasses.replace(args, shared_noise=False), 0, [])
    start, after, apart = (s["latents"][:, i].reshape(2, 6, -1) for s, i in ((shared, 0), (shared, 1), (own, 0)))
    assert torch.equal(start, start[:, :1].expand_as(start)) and torch.equal(start[:, 0], apart[:, 0])
    assert (start[0, 0] - start[1, 0]).abs().max() > 0.1
    assert min((after[p, m] - after[p, 0]).abs().max() for p in range(2) for m in range(1, 6)) > 1e-2
    assert min((apart[p, m] - apart[p, 0]).abs().max() for p in range(2) for m in range(1, 6)) > 0.1


def test_static_ovf_keeps_max_variance_subset(tiny):
    """--ovf_after_sampling keeps, per prompt, the OVF subset of the true final rewards."""
    pipe, _, prompts, text = tiny
    args = tiny_args(prune="none", ovf_after_sampling=3)
    samples, stats, audit = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 1, [])
    assert stats["nfe"] == 2 * 6 * 6 and len(samples["rewards"]) == 6
    full, _, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward,
                                 dataclasses.replace(args, ovf_after_sampling=0), 1, [])
    for p in range(2):
        assert audit[p]["survivors"] == progrpo.ovf_select(full["rewards"].view(2, 6)[p], 3).tolist()


def test_uniform_subset_is_a_seeded_uniform_draw(tiny):
    """--uniform_after_sampling K (Figure 2's control arm) keeps, per prompt, the K members uniform_select draws from
    (seed, epoch, prompt), audited like static OVF: the same again for a seed, others for other prompts and epochs,
    not OVF's choice; and the draw is uniform (each member kept k / n of the time, each k-subset about as often)."""
    pipe, _, prompts, text = tiny
    args = tiny_args(prune="none", num_steps=2, uniform_after_sampling=3)
    kept = {}
    for epoch in (1, 2, 1):
        samples, _, audit = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, epoch, [])
        for p, a in enumerate(audit):
            expected = progrpo.uniform_select(6, 3, progrpo.trajectory_seed(args.seed, epoch, p, "uniform")).tolist()
            end = a["checkpoints"][-1]
            assert a["survivors"] == expected == end["kept"] and end["step"] == 2 and end["members"] == list(range(6))
            assert a["final"] == [end["proxy"][m] for m in expected]  # the whole group's final rewards were scored
            assert kept.setdefault((epoch, p), expected) == expected  # the same again for the same seed
            kept[epoch, p, "ovf"] = progrpo.ovf_select(torch.tensor(end["proxy"]), 3).tolist()
    assert len({tuple(kept[e, p]) for e in (1, 2) for p in (0, 1)}) > 2  # other prompts and epochs, other draws
    assert any(kept[e, p] != kept[e, p, "ovf"] for e in (1, 2) for p in (0, 1))
    draws = torch.stack([progrpo.uniform_select(6, 3, seed) for seed in range(20_000)])  # (20000, 3)
    member_share = torch.bincount(draws.flatten(), minlength=6) / 20_000  # 1/2 each; sd 0.0035
    subset_share = torch.tensor(list(collections.Counter(map(tuple, draws.tolist())).values())) / 20_000
    assert (member_share - 0.5).abs().max() < 0.02 and len(subset_share) == 20  # C(6, 3) subsets, sd 0.0015
    assert (subset_share - 1 / 20).abs().max() < 0.007


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_ratio_is_one_on_first_update_step(tiny_dir, kind, precision):
    """With unchanged weights the recomputed log-probs equal the sampling ones, ratio 1 and no clipping, for every
    family (CFG or distilled guidance) and precision (frozen weights in its dtype, the forward under autocast),
    although sampling and the update batch the trajectories differently. Measured: |ratio - 1| <= 1.7e-6."""
    pipe = progrpo.load_pipeline(str(tiny_dir / kind), progrpo.DTYPES[precision])
    args = tiny_args(mixed_precision=precision, sample_batch_size=5, train_batch_size=4)  # different compositions
    params = progrpo.trainable_parameters(pipe, args)
    prompts = ["a red cat", "a blue dog"]
    text = progrpo.encode_prompts(pipe, prompts, 16)
    samples, _, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 0, [(2, 4), (4, 3)])
    adv = progrpo.group_advantages(samples["rewards"], samples["prompt_idx"])
    optimizer = torch.optim.SGD(params, lr=0.0)
    info = progrpo.train_epoch(pipe, params, optimizer, NO_SCALER, samples, adv, text, args, 0)
    assert samples["log_probs"].isfinite().all() and (adv != 0).any()
    assert info["first_step_ratio_dev"].max() < 1e-5 and (info["ratio"] - 1).abs().max() < 1e-5
    assert info["clipfrac"].max() == 0 and info["kl"].abs().max() < 1e-10


def epoch_gradient(pipe, params, samples, adv, text, args):
    """(the gradient train_epoch hands its optimiser, captured at the step, or None if it took none; its info)."""
    optimizer = torch.optim.SGD(params, lr=0.0)
    captured = []
    optimizer.step = lambda: captured.append(torch.cat([p.grad.flatten() for p in params]))
    info = progrpo.train_epoch(pipe, params, optimizer, NO_SCALER, samples, adv, text, args, 0)
    optimizer.zero_grad(set_to_none=True)
    return (captured[0] if captured else None), info


def test_every_sample_weighs_the_same_whatever_the_micro_batching(tiny):
    """5 trajectories in micro-batches of 2, 2 and 1 give the epoch gradient of micro-batches of 1 (and of one of 5)
    to fp32 round-off: the loss is a per-sample sum over the optimiser step's samples, not a mean of means."""
    pipe, params, prompts, text = tiny
    args = tiny_args(prune="none", mixed_precision="no", max_grad_norm=1e9)
    samples, _, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 0, [])
    rows = torch.tensor([0, 1, 2, 6, 7])  # 3 of prompt 0's group, 2 of prompt 1's
    adv = progrpo.group_advantages(samples["rewards"], samples["prompt_idx"])[rows]
    five = {k: v[rows] for k, v in samples.items()}
    grads = {b: epoch_gradient(pipe, params, five, adv, text, dataclasses.replace(args, train_batch_size=b))[0]
             for b in (1, 2, 5)}
    scale = grads[1].abs().max()
    assert scale > 0 and (adv != 0).all()
    torch.testing.assert_close(grads[2], grads[1], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(grads[5], grads[1], rtol=0, atol=1e-5 * scale)


def test_zero_advantage_samples_are_dropped_from_the_update(tiny):
    """Samples with advantage exactly 0 (a group of equal rewards) leave the update, as in Flow-GRPO: the gradient is
    the other samples' alone and zero_adv_dropped counts them; with nothing left the epoch takes no optimiser step
    and its metrics line still forms (policy statistics NaN)."""
    pipe, params, prompts, text = tiny
    args = tiny_args(prune="none", mixed_precision="no", max_grad_norm=1e9)
    samples, stats, audit = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 0, [])
    rewards = samples["rewards"].clone()
    rewards[:6] = 0.25  # prompt 0's group scored all the same
    adv = progrpo.group_advantages(rewards, samples["prompt_idx"])
    assert torch.equal(adv[:6], torch.zeros(6)) and (adv[6:] != 0).all()
    grad, info = epoch_gradient(pipe, params, samples, adv, text, args)
    alone, info_alone = epoch_gradient(pipe, params, {k: v[6:] for k, v in samples.items()}, adv[6:], text, args)
    assert info["zero_adv_dropped"].tolist() == [6] and info_alone["zero_adv_dropped"].tolist() == [0]
    torch.testing.assert_close(grad, alone, rtol=0, atol=0)  # the same micro-batches of the same samples
    nothing, info = epoch_gradient(pipe, params, samples, torch.zeros(12), text, args)
    assert nothing is None and len(info["loss"]) == 0 and info["zero_adv_dropped"].tolist() == [12]
    terms = samples["reward_terms"].unflatten(0, (2, -1))
    metrics = progrpo.epoch_metrics(0, rewards.view(2, -1), terms, stats, audit, info, args, [])
    assert metrics["policy/zero_adv_dropped"] == 12 and math.isnan(metrics["policy/loss"])
    assert math.isnan(metrics["policy/first_step_ratio_dev"]) and metrics["policy/skipped_steps"] == 0


def test_update_math_is_the_same_without_kernels(monkeypatch):
    """With progrpo_kernels/ absent, progrpo's own torch path gives the same log-probs, KL and gradients."""
    g = torch.Generator().manual_seed(0)
    v, v_ref, x, x_next = (torch.randn(3, 4, 5, 7, generator=g) for _ in range(4))
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.9, 0.5, 0.0])
    results = []
    sched = dict(sigma=sigma, sigma_next=sigma_next)
    for module in (progrpo.progrpo_kernels, None):
        monkeypatch.setattr(progrpo, "progrpo_kernels", module)
        v_ = v.clone().requires_grad_(True)
        logp, kl = progrpo.step_logprob(sched, torch.arange(3), v_, x, x_next, 0.7, v_ref)
        (logp.sum() + kl.sum()).backward()
        results.append((logp.detach(), kl.detach(), v_.grad))
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def lora_gradients(pipe, params, text, precision, x, x_next, logp_old, step, loss_factor, pure_fp16=False):
    """The LoRA gradient of the PPO loss at one stored step, through progrpo's predict / step_logprob / ppo_clip_loss
    and a GradScaler as train_epoch uses them; loss_factor scales the loss as a bigger latent and divisor would."""
    args = tiny_args(mixed_precision="no" if pure_fp16 else precision, guidance_scale=4.5)
    sched = progrpo.sampler_schedule(pipe, 10, 16, torch.device("cpu"))
    steps, rows = torch.full((len(x),), step), torch.arange(len(x)) % 2
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16" and not pure_fp16)
    optimizer = torch.optim.SGD(params, lr=0.0)
    if pure_fp16:  # the old path: fp16 weights (LoRA too), an fp16 forward, no autocast and no loss scaling
        out = progrpo.sd_cfg(pipe, x.half(), sched["timesteps"][steps], text, rows, 4.5)
    else:
        out = progrpo.predict(pipe, sched, steps, x, text, rows, args, len(x))
    logp_new, _ = progrpo.step_logprob(sched, steps, out, x, x_next, 0.7)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, _ = progrpo.ppo_clip_loss(logp_new, logp_old, adv, 1e-4)
    scaler.scale(loss * loss_factor).backward()
    scaler.unscale_(optimizer)
    grads = torch.cat([p.grad.flatten().float() for p in params])
    optimizer.zero_grad(set_to_none=True)
    return grads


SD35_FACTOR = (4 * 8 * 8) / (16 * 64 * 64) / (72 * 9)  # tiny latent / SD3.5-M's 512 px latent, one GPU's divisor


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_gradient_points_where_fp32_does(tiny_dir, precision):
    """At SD3.5-M's latent size (log-probs are means over 16x64x64 elements) and one GPU's loss divisor (72
    micro-batches x 9 steps), the LoRA gradient in fp16 (autocast + loss scaler) and bf16 (autocast) is non-zero at
    trained steps 0, 4 and 8 and points where the fp32 one points; the old pure-fp16 path gets exactly 0.

    Measured here (AMD EPYC, torch 2.13 CPU), cosine with fp32 at steps 0 / 4 / 8: fp16 0.91 / 0.99 / 0.42, bf16
    0.92 / 0.89 / 0.23; the old path 100% zeros. Step 8 (sigma 0.28 -> 0.009) has the smallest step std, so
    the half-precision forward's round-off is largest next to it: that is the forward's precision, not scaling."""
    g = torch.Generator().manual_seed(0)
    pipes = {}
    for name, dtype in (("fp32", torch.float32), (precision, progrpo.DTYPES[precision])):
        pipe = progrpo.load_pipeline(str(tiny_dir / "flow"), dtype)
        torch.manual_seed(0)  # the same LoRA initialisation in both
        params = progrpo.trainable_parameters(pipe, tiny_args())
        with torch.no_grad():
            for p in params:
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))  # B != 0
        pipes[name] = (pipe, params, progrpo.encode_prompts(pipe, ["a red cat", "a blue dog"], 16))
    pipe32, params32, text32 = pipes["fp32"]
    sched = progrpo.sampler_schedule(pipe32, 10, 16, torch.device("cpu"))
    args32 = tiny_args(mixed_precision="no")
    cosines = []
    for step in (0, 4, 8):
        x = torch.randn(4, 4, 8, 8, generator=g)
        steps, rows = torch.full((4,), step), torch.arange(4) % 2
        with torch.no_grad():
            out = progrpo.predict(pipe32, sched, steps, x, text32, rows, args32, 4)
        x_next, logp_old, _, _ = progrpo.sde_step_with_logprob(out, x, sched["sigma"][steps],
                                                               sched["sigma_next"][steps], 0.7,
                                                               noise=torch.randn(x.shape, generator=g))
        reference = lora_gradients(pipe32, params32, text32, "no", x, x_next, logp_old, step, SD35_FACTOR)
        half = lora_gradients(*pipes[precision], precision, x, x_next, logp_old, step, SD35_FACTOR)
        cosine = torch.nn.functional.cosine_similarity(half, reference, dim=0).item()
        assert reference.abs().sum() > 0 and (half != 0).float().mean() > 0.5, step
        cosines.append(cosine)
        assert cosine > 0.2, (step, cosine)  # the old fp16 path: no gradient at all (cosine 0)
        if precision == "fp16":  # what the sd35 presets ran before: every gradient underflows to exactly 0
            pipe16, params16, text16 = pipes["fp16"]
            for p in params16:
                p.data = p.data.half()
            old = lora_gradients(pipe16, params16, text16, "fp16", x, x_next, logp_old, step, SD35_FACTOR,
                                 pure_fp16=True)
            for p in params16:
                p.data = p.data.float()
            assert torch.count_nonzero(old) == 0, step
    assert sum(cosines) / 3 > 0.6, cosines


@pytest.mark.parametrize("full_finetune", [False, True])
def test_sd1_prunes_and_trains(tmp_path, tiny_dir, full_finetune):
    """Tiny SD1.x: NFE equals the formula with two checkpoints, ratio 1 on the first step, weights change."""
    pipe = progrpo.load_pipeline(str(tiny_dir / "ddim"), torch.float32, full_finetune)
    args = tiny_args(num_steps=8, group_size=8, prune="4:6,6:3", noise_level=1.0,
                     guidance_scale=5.0, learning_rate=1e-2, full_finetune=full_finetune,
                     beta=0.0 if full_finetune else 0.01)
    schedule = progrpo.parse_prune_schedule(args.prune, args.num_steps, args.group_size)
    params = progrpo.trainable_parameters(pipe, args)
    before = [p.detach().clone() for p in params]
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[0] // 2), with_kwargs=True)
    prompts = ["a red cat", "a blue dog"]
    text = progrpo.encode_prompts(pipe, prompts, 16)
    samples, stats, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 0, schedule)
    hook.remove()
    assert stats["nfe"] == sum(seen) == 2 * (5 * 8 + 2 * 6 + 1 * 3)
    adv = progrpo.group_advantages(samples["rewards"], samples["prompt_idx"])
    info = progrpo.train_epoch(pipe, params, torch.optim.AdamW(params, lr=args.learning_rate), NO_SCALER, samples, adv,
                               text, args, 0)
    assert (info["ratio"][:int(8 * 0.99)] - 1).abs().max() < 1e-5  # the steps before the first optimiser step
    changed = sum(not torch.equal(b, p) for b, p in zip(before, params))
    assert changed == len(params) if not full_finetune else changed > 0.9 * len(params)
    progrpo.save_weights(pipe, tmp_path, full_finetune)
    if full_finetune:
        from diffusers import UNet2DConditionModel

        reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), pipe.unet.state_dict().values()))
    else:
        fresh = progrpo.load_pipeline(str(tiny_dir / "ddim"), torch.float32)
        fresh.load_lora_weights(str(tmp_path))
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        assert torch.allclose(fresh.unet(x, t, text["embeds"][:1]).sample, pipe.unet(x, t, text["embeds"][:1]).sample,
                              atol=1e-5)


def test_missing_optional_package_is_named(monkeypatch):
    """The HPSv2 reward without open_clip installed says which package to install, in one line."""
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(progrpo.RunError, match="pip install open_clip_torch"):
        scorers.HPSv2("cpu")


def test_nan_reward_stops_the_run_naming_the_prompt(tiny):
    """A reward that comes back NaN raises RunError naming the prompt instead of training on it."""
    pipe, _, prompts, text = tiny

    def nan_reward(images, ps):
        return torch.tensor([float("nan") if "blue" in p else 0.0 for p in ps])

    with pytest.raises(progrpo.RunError, match="a blue dog"):
        progrpo.rollout(pipe, text, prompts, nan_reward, tiny_args(), 0, [(2, 4), (4, 3)])


def nan_loss(monkeypatch, every=True):
    """Make train_epoch's PPO loss NaN (through its gradient too): at every step, or at its first step only."""
    clip_loss, calls = progrpo.ppo_clip_loss, []

    def poisoned(*args):
        loss, ratio = clip_loss(*args)
        calls.append(1)
        return (loss * math.nan if every or len(calls) == 1 else loss), ratio

    monkeypatch.setattr(progrpo, "ppo_clip_loss", poisoned)


def test_a_nonfinite_gradient_skips_its_own_step_only(monkeypatch, tiny):
    """fp32: a NaN loss in the epoch's first micro-batch skips that optimiser step (counted, NaN norm) and no other:
    AdamW takes the second step alone, from zeroed gradients, and the weights stay finite."""
    pipe, params, prompts, text = tiny
    args = tiny_args(updates_per_epoch=2)  # 6 survivors in micro-batches of 4: two optimiser steps
    samples, _, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 0, [(2, 4), (4, 3)])
    adv = progrpo.group_advantages(samples["rewards"], samples["prompt_idx"])
    nan_loss(monkeypatch, every=False)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    try:
        info = progrpo.train_epoch(pipe, params, optimizer, NO_SCALER, samples, adv, text, args, 0)
        after = [p.detach().clone() for p in params]
    finally:
        for p, b in zip(params, before):  # the module's other tests see the weights they expect
            p.data.copy_(b)
    assert info["skipped"].tolist() == [1, 0] and info["grad_norm"][0].isnan() and info["grad_norm"][1].isfinite()
    assert all(optimizer.state[p]["step"] == 1 for p in params)
    assert all(a.isfinite().all() for a in after) and not all(torch.equal(a, b) for a, b in zip(after, before))


# ---------------------------------------------------------------------------------------------------
# Model families: SD3, SD1.x and FLUX.1 behind one boundary
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", FAMILY_KINDS + ["flux-schnell"])
def test_deterministic_sampler_is_the_pipelines_own(tmp_path, tiny_dir, kind):
    """sample_deterministic (the evaluation sampler) gives, from the same latents and conditioning, the images of the
    family's own diffusers pipeline: SD3's Euler with CFG, SD1's DDIM eta 0 with CFG, FLUX.1-dev's Euler on packed
    latents with dynamically shifted sigmas and its distilled guidance input, FLUX.1-schnell's without either.
    Measured: bit for bit in fp32."""
    folder = tiny_dir / kind
    if kind == "flux-schnell":  # save_tiny writes dev only
        tiny_models.build_tiny_pipeline(kind).save_pretrained(folder := tmp_path / kind)
    pipe = progrpo.load_pipeline(str(folder), torch.float32)
    args = tiny_args(guidance_scale=3.5, mixed_precision="no")
    prompts = ["a red cat", "a blue dog"]
    text = progrpo.encode_prompts(pipe, prompts, 16)
    ours = progrpo.sample_deterministic(pipe, text, args, 4, seed=0)
    shape = progrpo.latent_shape(pipe, 16)  # the noise sample_deterministic draws: one generator per prompt
    x = torch.stack([torch.randn(shape,
                                 generator=torch.Generator().manual_seed(progrpo.trajectory_seed(0, "eval", p, 0)))
                     for p in range(2)])
    call = dict(latents=x, num_inference_steps=4, guidance_scale=3.5, output_type="pt", height=16, width=16,
                prompt_embeds=text["embeds"], **({"pooled_prompt_embeds": text["pooled"]} if "pooled" in text else {}))
    for k, v in text.get("negative", {}).items():  # CFG: the empty prompt's row for every prompt
        call[{"embeds": "negative_prompt_embeds",
              "pooled": "negative_pooled_prompt_embeds"}[k]] = v.expand(2, *v.shape[1:])
    with torch.no_grad():
        theirs = pipe(**call, **({"eta": 0.0} if kind == "ddim" else {})).images
    assert shape == ((16, 64) if kind.startswith("flux") else (4, 8, 8)) and ours.std() > 0.05
    assert ("negative" in text) == (kind in ("flow", "ddim"))  # FLUX is guided without a negative prompt
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_flux_schedule_latents_and_conditioning_are_fluxpipelines():
    """FLUX.1's pieces against FluxPipeline's own: the sigmas shift with the image's token count (mu from
    calculate_shift; FLUX.1-schnell: unshifted linspace(1, 1/T, T)), latent_shape is prepare_latents' packed shape,
    decode unpacks as _unpack_latents does, and the conditioning is encode_prompt's T5 sequence and pooled CLIP."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    dev, schnell = tiny_models.build_tiny_pipeline("flux"), tiny_models.build_tiny_pipeline("flux-schnell")
    for resolution in (16, 64):
        tokens = (resolution // 4) ** 2  # the tiny VAE halves the side, then 2x2 patches
        packed = dev.prepare_latents(1, 16, resolution, resolution, torch.float32, "cpu", torch.Generator())[0]
        assert progrpo.latent_shape(dev, resolution) == tuple(packed.shape[1:]) == (tokens, 64)
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        linspace = torch.linspace(1, 1 / 6, 6, dtype=torch.float64)
        shifted = math.exp(mu) / (math.exp(mu) + 1 / linspace - 1)
        for pipe, expected in ((dev, shifted), (schnell, linspace)):
            sched = progrpo.sampler_schedule(pipe, 6, resolution, "cpu")
            torch.testing.assert_close(sched["sigma"].double(), expected, rtol=0, atol=1e-6)
            assert sched["sigma_next"][-1] == 0 and torch.equal(sched["sigma"][1:], sched["sigma_next"][:-1])
    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0))
    unpacked = FluxPipeline._unpack_latents(x, 16, 16, dev.vae_scale_factor)
    image = dev.vae.decode(unpacked / dev.vae.config.scaling_factor + dev.vae.config.shift_factor).sample
    torch.testing.assert_close(progrpo.decode(dev, x), (image / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
    text = progrpo.encode_prompts(dev, ["a red cat"], 16)
    with torch.no_grad():  # as encode_prompts runs it (the built pipeline's encoders are not frozen)
        embeds, pooled, _ = dev.encode_prompt(["a red cat"], max_sequence_length=16)
    assert (set(text) == {"embeds", "pooled"} and torch.equal(text["embeds"], embeds)
            and torch.equal(text["pooled"], pooled))


def test_each_family_loads_by_its_class_and_an_unknown_one_is_refused_unloaded(tmp_path, tiny_dir, caplog):
    """load_pipeline reads the class from model_index.json: FLUX loads without the safety_checker argument (which
    diffusers warns FluxPipeline does not take, as the control shows), SD1.x with DDPO's DDIM; a class no row names is
    one RunError listing the supported ones, raised before any component loads (the folder holds none)."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    flux = progrpo.load_pipeline(str(tiny_dir / "flux"), torch.float32)
    assert type(flux).__name__ == "FluxPipeline" and "safety_checker" not in caplog.text
    DiffusionPipeline.from_pretrained(str(tiny_dir / "flux"), safety_checker=None)  # what load_pipeline used to pass
    assert "{'safety_checker': None} are not expected by FluxPipeline" in caplog.text
    assert isinstance(progrpo.load_pipeline(str(tiny_dir / "ddim"), torch.float32).scheduler, DDIMScheduler)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline",
                                                           "unet": ["diffusers", "X"]}))
    with pytest.raises(progrpo.RunError, match="is a KandinskyPipeline; supported: StableDiffusion3Pipeline, "
                                               "StableDiffusionPipeline, FluxPipeline"):
        progrpo.load_pipeline(str(tmp_path), torch.float32)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_saved_lora_loads_with_the_pipelines_own_loader(tmp_path, tiny_dir, kind):
    """After an optimiser step the LoRA save_weights writes loads into a fresh pipeline through its class's own
    load_lora_weights (FluxPipeline's for FLUX) onto every adapted layer, and gives the trained guided output."""
    pipe = progrpo.load_pipeline(str(tiny_dir / kind), torch.float32)
    args = tiny_args(mixed_precision="no", prune="none", num_steps=2, learning_rate=1e-2)
    params = progrpo.trainable_parameters(pipe, args)
    prompts = ["a red cat", "a blue dog"]
    text = progrpo.encode_prompts(pipe, prompts, 16)
    samples, _, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 0, [])
    adv = progrpo.group_advantages(samples["rewards"], samples["prompt_idx"])
    progrpo.train_epoch(pipe, params, torch.optim.AdamW(params, lr=1e-2), NO_SCALER, samples, adv, text, args, 0)
    progrpo.save_weights(pipe, tmp_path, full_finetune=False)
    fresh = type(pipe).from_pretrained(str(tiny_dir / kind))
    fresh.load_lora_weights(str(tmp_path))
    adapted = [n for n, _ in progrpo.denoiser(pipe).named_parameters() if "lora_A" in n]
    assert len(adapted) == sum("lora_A" in n for n, _ in progrpo.denoiser(fresh).named_parameters()) > 0
    x, t, rows = samples["latents"][:2, 1], torch.full((2,), 500.0), torch.arange(2)
    with torch.no_grad():
        trained, loaded = (progrpo.guided_output(p, x, t, text, rows, 4.5) for p in (pipe, fresh))
        base = progrpo.guided_output(type(pipe).from_pretrained(str(tiny_dir / kind)), x, t, text, rows, 4.5)
    assert (trained - base).abs().max() > 1e-4  # the step moved the output: the comparison can fail
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)


def test_flux_trains_resumes_and_evaluates_from_the_command_line(tmp_path, tiny_dir):
    """FLUX.1 through main with run.sh's flux flags at the tiny size: 2 epochs straight == 1, stop, resume to 2
    (metrics and saved LoRA bit for bit), and --eval_only on the saved weights reproduces the last evaluation."""
    from safetensors.torch import load_file

    flags = short_run(tiny_dir) + ["--pretrained_model_name_or_path", str(tiny_dir / "flux"), "--guidance_scale", "3.5",
                                   "--noise_level", "0.9", "--beta", "0", "--prune", "3:4,4:3", "--num_epochs", "2",
                                   "--checkpointing_steps", "1", "--eval_every", "1", "--eval_steps", "4", "--ema"]
    args = progrpo.parse_args(flags)
    straight = progrpo.main(dataclasses.replace(args, output_dir=str(tmp_path / "straight")))
    progrpo.main(dataclasses.replace(args, num_epochs=1, output_dir=str(tmp_path / "resumed")))
    resumed = progrpo.main(dataclasses.replace(args, output_dir=str(tmp_path / "resumed"),
                                               resume_from_checkpoint="latest"))
    assert without_times(resumed) == without_times(straight) and straight[0]["perf/nfe_sample"] == 4 * (4 * 6 + 4 + 3)
    assert all(math.isfinite(m["policy/loss"]) and m["policy/first_step_ratio_dev"] < 1e-5 for m in straight)
    a, b = (load_file(tmp_path / run / "pytorch_lora_weights.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and any("ff_context.net.2" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    again = progrpo.main(dataclasses.replace(args, output_dir=str(tmp_path / "eval"),
                                             eval_only=str(tmp_path / "straight")))
    assert abs(again[0]["eval/reward_mean"] - straight[-1]["eval/reward_mean"]) < 1e-5


FAMILY_SECTION, NEXT_SECTION = "# ---- ALGO LOGIC: the model family", "# ---- ALGO LOGIC: rewards"
PORT = '''
def encode_flux_cfg(pipe, prompts, max_sequence_length, device):
    """A de-distilled FLUX.1: FLUX's conditioning and the empty prompt's, for classifier-free guidance."""
    return dict(encode_flux(pipe, prompts, max_sequence_length, device),
                negative=encode_flux(pipe, [""], max_sequence_length, device))


def flux_cfg(pipe, x, t, text, rows, scale):
    """Classifier-free guidance around FLUX's call (its own guidance input at 1): both halves in one call."""
    both = {k: torch.cat([text["negative"][k], v]) for k, v in text.items() if k != "negative"}
    o_uncond, o_text = flux_distilled(pipe, torch.cat([x, x]), torch.cat([t, t]), both,
                                      torch.cat([0 * rows, rows + 1]), 1.0).chunk(2)
    return o_uncond + scale * (o_text - o_uncond)


FAMILIES["DeDistilledFluxPipeline"] = dict(FAMILIES["FluxPipeline"], output=flux_cfg, encode=encode_flux_cfg)

'''


def test_a_new_family_is_ported_by_editing_the_family_section_only(monkeypatch, tmp_path, tiny_dir):
    """The model-family section is the only place a port edits: progrpo.py holds one, between its header and the
    rewards section's, the sections above it never name a pipeline class nor read a row, and a fork that only adds a
    row and two functions at its end (a de-distilled FLUX class under classifier-free guidance) samples, prunes and
    takes an optimiser step with the rest of progrpo.py untouched."""
    from diffusers import FluxPipeline

    text = (ROOT / "progrpo.py").read_text()
    start, end = text.index(FAMILY_SECTION), text.index(NEXT_SECTION)
    assert text.count(FAMILY_SECTION) == text.count(NEXT_SECTION) == 1 and start < end
    for name in ("FAMILIES = {", "def load_pipeline(", "def trainable_parameters(", "def encode_prompts(",
                 "def guided_output(", "def latent_shape(", "def sampler_schedule(", "def decode("):
        assert start < text.index(name) < end, name
    above = text[:start]
    assert not re.search(r"family\(|FAMILIES|Pipeline\b|StableDiffusion|Flux", above)  # no family knowledge above
    fork = text[:end] + PORT.lstrip("\n") + "\n" + text[end:]
    assert fork[:start] == text[:start] and fork[fork.index(NEXT_SECTION):] == text[end:]
    (tmp_path / "progrpo_fork.py").write_text(fork)
    spec = importlib.util.spec_from_file_location("progrpo_fork", tmp_path / "progrpo_fork.py")
    forked = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "progrpo_fork", forked)  # its dataclass looks itself up there
    spec.loader.exec_module(forked)

    DeDistilledFluxPipeline = type("DeDistilledFluxPipeline", (FluxPipeline,), {})  # a pipeline class of its own
    pipe = DeDistilledFluxPipeline(**forked.load_pipeline(str(tiny_dir / "flux"), torch.float32).components)
    args = forked.Args(**{**dataclasses.asdict(tiny_args()), "mixed_precision": "no", "learning_rate": 1e-2})
    params, prompts = forked.trainable_parameters(pipe, args), ["a red cat", "a blue dog"]
    text = forked.encode_prompts(pipe, prompts, 16)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(len(kw["hidden_states"])),
                                                      with_kwargs=True)
    try:
        samples, stats, _ = forked.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 0, [(2, 4), (4, 3)])
    finally:
        hook.remove()
    assert "negative" in text and stats["nfe"] == 58 and sum(seen) == 2 * 58  # CFG: two rows per trajectory-step
    before = [p.detach().clone() for p in params]
    adv = forked.group_advantages(samples["rewards"], samples["prompt_idx"])
    info = forked.train_epoch(pipe, params, torch.optim.AdamW(params, lr=1e-2), NO_SCALER, samples, adv, text, args, 0)
    assert info["first_step_ratio_dev"].max() < 1e-5 and not info["skipped"].any()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))  # every LoRA weight took the step


# ---------------------------------------------------------------------------------------------------
# End to end, and the command line
# ---------------------------------------------------------------------------------------------------

def demo_args(tiny_dir, **overrides):
    """The old colour demo on the tiny random model, shortened: 60 epochs take ~80 s on 2 cores."""
    base = dict(pretrained_model_name_or_path=str(tiny_dir / "flow"), prompts=str(tiny_dir / "train.txt"),
                eval_prompts=str(tiny_dir / "test.txt"), reward="repro.tiny.Colour", resolution=16,
                mixed_precision="no", max_sequence_length=16, num_epochs=60, prompts_per_epoch=6, group_size=16,
                prune="5:8,7:4", sample_batch_size=32, decode_batch_size=32, train_batch_size=8, eval_steps=10,
                eval_every=30, checkpointing_steps=1000, learning_rate=5e-3, clip_range=1e-2, beta=0.0, ema=False)
    return progrpo.Args(**{**base, **overrides})


def test_demo_trains_end_to_end(tmp_path, tiny_dir):
    """A short demo run: finite losses, LoRA weights change and reload through diffusers, reward rises."""
    args = demo_args(tiny_dir, output_dir=str(tmp_path))
    history = progrpo.main(args)
    assert all(math.isfinite(m["policy/loss"]) for m in history)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == args.num_epochs and lines[0]["perf/nfe_sample"] == args.prompts_per_epoch * 120
    assert lines[0]["reward/repro.tiny.Colour"] == lines[0]["reward/mean"]  # one term of weight 1: the sum itself
    audit = [json.loads(line) for line in (tmp_path / "prune_audit.jsonl").read_text().splitlines()]
    assert len(audit) == args.num_epochs * args.prompts_per_epoch and len(audit[0]["checkpoints"]) == 2
    assert (tmp_path / "reward_curve.png").is_file() and len(list((tmp_path / "samples").glob("*.png"))) >= 2
    means = torch.tensor([m["reward/mean"] for m in history])
    first, last = means[:10].mean().item(), means[-10:].mean().item()
    noise = means[:10].std().item() / math.sqrt(10)  # epoch-to-epoch noise of a 10-epoch average
    assert last - first > max(0.08, 6 * noise), (first, last, noise)
    # the saved LoRA loads into a fresh tiny pipeline through diffusers and reproduces the trained model:
    # its evaluation reward equals the one the run logged after its last update
    eval_prompts = progrpo.read_prompts(args.eval_prompts)[:args.num_eval_prompts]
    scores = []
    for lora in (str(tmp_path), None):
        pipe = progrpo.load_pipeline(args.pretrained_model_name_or_path, torch.float32)
        if lora:
            pipe.load_lora_weights(lora)
        text = progrpo.encode_prompts(pipe, eval_prompts, 16)
        images = progrpo.sample_deterministic(pipe, text, args, args.eval_steps, args.seed)
        scores.append(tiny_models.colour_reward(images, eval_prompts).mean().item())
    assert abs(scores[0] - history[-1]["eval/reward_mean"]) < 1e-5
    assert scores[0] > scores[1] + 0.05  # and it is better than the base model


def run_cli(*flags, cwd=ROOT, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "progrpo.py"), *flags], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def short_run(tiny_dir):
    """CLI flags of a seconds-long run on the tiny SD3 model: 4 prompts x 6 trajectories, 6 steps."""
    return ["--pretrained_model_name_or_path", str(tiny_dir / "flow"), "--prompts", str(tiny_dir / "train.txt"),
            "--eval_prompts", str(tiny_dir / "test.txt"), "--reward", "repro.tiny.Colour", "--resolution", "16",
            "--mixed_precision", "no", "--max_sequence_length", "16", "--prompts_per_epoch", "4", "--group_size", "6",
            "--num_steps", "6", "--prune", "2:4,4:3", "--sample_batch_size", "1", "--decode_batch_size", "1",
            "--reward_batch_size", "1", "--train_batch_size", "3", "--updates_per_epoch", "1", "--eval_every", "0",
            "--learning_rate", "1e-2", "--clip_range", "1e-2", "--rank", "4", "--lora_alpha", "8", "--no-ema"]


BAD_INPUTS = [  # (flags, the message's key words); each must fail before any model loads
    (["--prune", "7:24,5:12"], "strictly increasing"),
    (["--prune", "2:4,4:4"], "strictly decrease"),
    (["--prune", "2:4,4:1"], "at least 2 survivors"),
    (["--group_size", "1", "--prune", "none"], "--group_size must be at least 2"),
    (["--group_size", "99999999999"], "--group_size must be at most 2147483647"),
    (["--reward", "beauty"], "unknown reward 'beauty'"),
    (["--reward", "repro.tiny.NoSuchReward"], "unknown reward 'repro.tiny.NoSuchReward'"),
    (["--reward", "os.path"], "unknown reward 'os.path'"),  # it imports, but is no factory
    (["--reward", "..tiny.Colour"], "unknown reward '..tiny.Colour'"),  # a relative import
    (["--reward", "repro.tiny.Colour:heavy"], "reward weight 'heavy'"),
    (["--reward", "repro.tiny.Colour:inf"], "reward weight 'inf' in 'repro.tiny.Colour:inf' is not a finite number"),
    (["--prompts", "no_such_prompts.txt"], "--prompts 'no_such_prompts.txt' not found"),
    (["--prompts", "EMPTY"], "--prompts 'EMPTY' has no prompts"),
    (["--prompts", "BINARY"], "--prompts 'BINARY' is binary"),
    (["--prompts", "."], "--prompts '.' is a folder"),
    (["--eval_prompts", "EMPTY"], "--eval_prompts 'EMPTY' has no prompts"),
    (["--learning_rate", "-0.001"], "--learning_rate must be at least 0"),
    (["--learning_rate", "1e39"], "--learning_rate must be a finite number within fp32's range"),
    (["--beta", "inf"], "--beta must be a finite number"),
    *[([f"--{f.name}", "nan"], f"--{f.name} must be a finite number")  # every float flag
      for f in dataclasses.fields(progrpo.Args) if f.type == "float"],
    (["--num_eval_prompts", "0"], "--num_eval_prompts must be at least 1"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--lora_alpha", "0"], "--lora_alpha must be at least 1"),
    (["--max_sequence_length", "0"], "--max_sequence_length must be at least 1"),
    (["--max_sequence_length", "1000"], "at most 512"),
    (["--resolution", "0"], "--resolution must be at least 16"),
    (["--resolution", "40"], "multiple of 16"),
    (["--resolution", "65536"], "--resolution must be at most 4096"),
    (["--num_steps", "0"], "--num_steps must be at least 1"),  # not a --prune or --timestep_fraction problem
    (["--num_steps", "0", "--prune", "none"], "--num_steps must be at least 1"),
    (["--num_steps", "5000", "--prune", "none"], "--num_steps must be at most 1000"),
    (["--num_steps", "1", "--prune", "none"], "train at least one of the --num_steps 1 steps"),
    (["--num_epochs", "0"], "--num_epochs must be at least 1"),
    (["--checkpointing_steps", "0"], "--checkpointing_steps must be at least 1"),
    (["--eval_steps", "0"], "--eval_steps must be at least 1"),
    (["--eval_every", "-1"], "--eval_every must be at least 0"),
    (["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
    (["--adv_clip_max", "-1"], "--adv_clip_max must be positive"),
    (["--clip_range", "-1"], "--clip_range must be positive"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be positive"),
    (["--noise_level", "0"], "--noise_level must be positive"),
    (["--adam_beta1", "1"], "--adam_beta1 must be in [0, 1)"),
    (["--beta", "-0.1"], "--beta must be at least 0"),
    (["--timestep_fraction", "0"], "--timestep_fraction"),
    (["--mixed_precision", "fp8"], "--mixed_precision must be no, fp16 or bf16"),
    (["--ovf_after_sampling", "12"], "--ovf_after_sampling 12 must be in [2, 3)"),
    (["--uniform_after_sampling", "3"], "--uniform_after_sampling 3 must be in [2, 3)"),
    (["--ovf_after_sampling", "2", "--uniform_after_sampling", "2"], "--uniform_after_sampling exclude each other"),
    (["--full_finetune", "--beta", "0.01"], "--full_finetune has no frozen reference"),
    (["--pretrained_model_name_or_path", "./no/such/model"],
     "--pretrained_model_name_or_path './no/such/model' is neither a hub id nor a folder with model_index.json"),
    (["--pretrained_model_name_or_path", "EMPTY"], "'EMPTY' is neither a hub id"),  # a file
    (["--pretrained_model_name_or_path", "."], "'.' is neither a hub id"),  # a folder, but no pipeline's
    (["--resume_from_checkpoint", "no/such/checkpoint-9"], "'no/such/checkpoint-9' is not a checkpoint folder"),
    (["--resume_from_checkpoint", "EMPTY"], "--resume_from_checkpoint 'EMPTY' is not a checkpoint folder"),
    (["--resume_from_checkpoint", "TORN"], "--resume_from_checkpoint 'TORN' is not a checkpoint folder"),
    (["--output_dir", "EMPTY"], "is a file, not a folder"),
    (["--output_dir", "EMPTY/run"], "--output_dir 'EMPTY/run': 'EMPTY' is a file, not a folder"),
    (["--output_dir", ""], "--output_dir is empty"),
    (["--eval_only", "EMPTY"], "--eval_only 'EMPTY' is not a folder holding what a run saves"),
    (["--eval_only", "."], "--eval_only '.' is not a folder holding what a run saves"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS)
def test_bad_input_is_refused_before_any_model_loads(monkeypatch, tmp_path, tiny_dir, flags, message):
    """Each bad input raises the one-line RunError that says what is wrong, before any model or reward loads."""
    (tmp_path / "EMPTY").write_text("\n  \n")
    (tmp_path / "BINARY").write_bytes(bytes(range(256)))
    (tmp_path / "TORN").mkdir()
    (tmp_path / "TORN" / "training_state.pt").write_bytes(b"\x80\x02truncated")  # a checkpoint cut short
    monkeypatch.chdir(tmp_path)

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(progrpo, "load_pipeline", loaded)
    monkeypatch.setattr(progrpo, "build_reward", loaded)
    with pytest.raises(progrpo.RunError) as error:
        progrpo.main(progrpo.parse_args(short_run(tiny_dir) + ["--output_dir", str(tmp_path / "out"), *flags]))
    assert message in str(error.value) and "\n" not in str(error.value)


CLI_BAD_INPUTS = [case for case in BAD_INPUTS if case[0] in (["--reward", "beauty"], ["--beta", "inf"],
                                                              ["--pretrained_model_name_or_path", "./no/such/model"])]


@pytest.mark.parametrize("flags, message", CLI_BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, tiny_dir, flags, message):
    """On the command line a bad input is one line on stderr, exit code 2, no traceback."""
    result = run_cli(*short_run(tiny_dir), "--output_dir", str(tmp_path / "out"), *flags, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "Loading pipeline" not in result.stderr + result.stdout


def test_a_value_that_does_not_parse_is_one_usage_line_and_one_error_line():
    """argparse's refusals are two lines and exit code 2: a one-line usage and the error that names the flag."""
    result = run_cli("--num_steps", "ten")
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "usage: progrpo.py [--flag VALUE ...]", "progrpo.py: error: argument --num_steps: invalid int value: 'ten'"]


RUN_SH_BAD_INPUTS = [  # (run.sh's arguments, words of its last line on stderr)
    (["nonsense"], "error: unknown preset 'nonsense'; choose demo, shapes, test, "),
    (["compare", "shapes", "--methods", "pro-grpo,nope"], "error: --methods: unknown nope; choose from grpo, "),
    (["compare", "shapes-pool", "--grid_learning_rate", "1e-3,x"], "error: --grid_learning_rate takes a comma list"),
    (["sd14", "--beta", "0.01"], "error: --full_finetune has no frozen reference for the KL: use --beta 0"),
    (["sd35", "--bogus"], "progrpo.py: error: unrecognized arguments: --bogus"),
    (["eval", "sd99"], "eval.py: error: argument preset: invalid choice: 'sd99'"),
]


@pytest.mark.parametrize("words, message", RUN_SH_BAD_INPUTS)
def test_run_sh_refuses_an_unknown_preset_or_a_flag_its_preset_cannot_take(tmp_path, words, message):
    """run.sh refuses an unknown preset or a flag its preset cannot take in one line, exit 2, before any download."""
    # run.sh runs from a copy whose .venv is set up (its stamp current) with this Python, which refuses to pip install
    for name in ("run.sh", "requirements.txt", "requirements.lock"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text('#!/bin/sh\ncase "$*" in *"-m pip"*) echo "error: no installs here" >&2; exit 1;; esac\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    stamp = hashlib.sha256((ROOT / "requirements.txt").read_bytes() + (ROOT / "requirements.lock").read_bytes())
    (tmp_path / ".venv" / ".installed").write_text(stamp.hexdigest()[:16] + "\n")  # run.sh's: nothing to install
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", str(tmp_path / "run.sh"), *words], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 2 and message in result.stderr.splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "dataset").exists()


STAND_IN_PYTHON = """#!/bin/sh
case "$*" in  # the throwaway venv's python: pip installs nothing, freeze prints FREEZE, pytest says SUITE's verdict
    "-m pip freeze"*) cat "$FREEZE" ;;
    "-m pip"*) [ "$SUITE" != uninstallable ] ;;
    "-m pytest"*) if [ "$SUITE" = pass ]; then echo "3 passed in 0.01s"; exit 0; fi
                  echo "FAILED test_progrpo.py::test_x - AssertionError"; echo "1 failed, 2 passed in 0.01s"; exit 1 ;;
    *platform*) echo 3.11.7 ;;
    *) exit 3 ;;
esac
"""


@pytest.mark.parametrize("suite", ["uninstallable", "fail", "pass"])
def test_run_sh_lock_rewrites_the_lock_only_when_the_suite_passes(tmp_path, suite):
    """`bash run.sh lock` under newer versions (a stand-in venv reports transformers 99.0): a set pip cannot install,
    or a failing suite (its failing test and the versions that moved printed), exits 1 and leaves the lock as it
    was; a passing suite rewrites it."""
    for name in ("run.sh", "requirements.txt", "requirements.lock"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    lock = (ROOT / "requirements.lock").read_text()
    freeze = tmp_path / "freeze.txt"  # the lock's pins with one moved forward
    freeze.write_text("".join(("transformers==99.0" if line.startswith("transformers==") else line) + "\n"
                              for line in lock.splitlines() if not line.startswith("#")))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(STAND_IN_PYTHON)
    (tmp_path / "bin" / "python3").write_text('#!/bin/sh\n[ "$1 $2" = "-m venv" ] || exit 3\n'
                                              f'mkdir -p "$3/bin" && cp "{tmp_path}/bin/python" "$3/bin/python"\n')
    for f in (tmp_path / "bin").iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FREEZE": str(freeze), "SUITE": suite}
    result = subprocess.run(["bash", str(tmp_path / "run.sh"), "lock"], capture_output=True, text=True, env=env,
                            timeout=120)
    new_lock = (tmp_path / "requirements.lock").read_text()
    if suite == "uninstallable":
        assert result.returncode == 1 and "that set does not install" in result.stderr and new_lock == lock
    elif suite == "fail":
        assert result.returncode == 1 and "FAILED test_progrpo.py::test_x" in result.stderr, result.stderr
        assert "under the new versions: transformers==99.0" in result.stderr and new_lock == lock
    else:
        assert result.returncode == 0, result.stderr
        assert "transformers==99.0" in new_lock.splitlines() and "3 passed" in new_lock.splitlines()[1]
        assert new_lock.replace("transformers==99.0", "").count("==") == lock.count("==") - 1  # the rest as before


FLAG_VALUES = {  # any value, as a tired user types it: edges, huge, non-finite, the wrong type, paths of every kind
    "int": st.one_of(st.integers(-2, 64).map(str), st.integers().map(str),
                     st.sampled_from([str(2**31), str(2**63), "1" + "0" * 30, "ten", "1.5", ""])),
    "float": st.one_of(st.floats(-2, 2).map(repr), st.floats().map(repr),
                       st.sampled_from(["nan", "-inf", "1e999", "1e39", "-0.0", "5e-324", "lots", ""])),
    "str": st.text(max_size=12) | st.sampled_from(["", ".", "none", "latest", "5:24,7:12", "repro.tiny.Colour:nan",
                                                    "a" * 5000, str(ROOT / "progrpo.py"), str(ROOT / "repro"),
                                                    str(ROOT / "repro" / "digits" / "pipeline")]),
}


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_parsing_and_validation_fail_only_with_one_line(data):
    """Any values of any flags pass parse_args + validate or fail in one line: a RunError or argparse's exit 2."""
    argv = []
    for f in data.draw(st.lists(st.sampled_from(dataclasses.fields(progrpo.Args)), unique=True), label="flags"):
        if f.type == "bool":
            argv.append(data.draw(st.sampled_from([f"--{f.name}", f"--no-{f.name}"])))
        else:
            argv.append(f"--{f.name}=" + data.draw(FLAG_VALUES[f.type], label=f.name))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            progrpo.validate(progrpo.parse_args(argv))
    except progrpo.RunError as e:
        assert str(e) and "\n" not in str(e)
    except SystemExit as e:
        lines = stderr.getvalue().splitlines()
        assert e.code == 2 and len(lines) == 2 and lines[0].startswith("usage:") and ": error: " in lines[1]


def test_output_dir_dot_and_help(tmp_path, tiny_dir):
    """--output_dir . saves its weights into the current folder; --help prints every flag without formatting errors."""
    result = run_cli(*short_run(tiny_dir), "--num_epochs", "1", "--output_dir", ".", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file() and not (tmp_path / ".saving").exists()
    help_text = run_cli("--help").stdout
    assert "--gradient_checkpointing" in help_text and "~30% slower" in help_text and "%%" not in help_text


def test_args_defaults_are_the_sd35_preset():
    """Every flag `bash run.sh sd35` passes (its SD35 array and its own launch line; the output folder aside) has
    progrpo.Args' default as its value, so `python progrpo.py` with no flags runs the paper's setting."""
    text = (ROOT / "run.sh").read_text()
    array = re.search(r"^SD35=\((.*?)\)", text, re.S | re.M)[1]
    block = re.search(r"^\s*sd35\)(.*?);;", text, re.S | re.M)[1]
    launch = re.search(r'launch (?:\w+ )?"\$\{SD35\[@\]\}"(.*?)"\$@"', block, re.S)[1]  # after its fetch step
    tokens = shlex.split(array) + shlex.split(launch)
    names = {t[2:].removeprefix("no-") for t in tokens if t.startswith("--")} - {"output_dir"}
    preset, defaults = progrpo.parse_args(tokens), progrpo.Args()
    assert len(names) >= 20 and {"ema", "sample_batch_size", "train_batch_size", "group_size", "prune"} <= names
    pairs = {n: (getattr(preset, n), getattr(defaults, n)) for n in names}  # (the preset's value, Args' default)
    assert {n: pair for n, pair in pairs.items() if pair[0] != pair[1]} == {}


def test_reward_model_not_cached_offline_is_one_line(tmp_path, tiny_dir):
    """A hub reward model that is not cached, offline, is one line and exit 2 (not a 57-line traceback)."""
    result = run_cli(*short_run(tiny_dir), "--reward", "repro.scorers.PickScore", "--output_dir", str(tmp_path),
                     env={"HF_HOME": str(tmp_path / "empty-cache")})
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1 and "could not load the 'repro.scorers.PickScore'" in lines[0]
    assert "Traceback" not in result.stderr


def test_eval_only_on_torn_weights_is_one_line(tmp_path, tiny_dir):
    """--eval_only on a torn LoRA file or an empty transformer/ is one RunError line naming it, not a traceback."""
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"torn")
    (tmp_path / "full" / "transformer").mkdir(parents=True)
    for folder, message in (("lora", "pytorch_lora_weights.safetensors is not a safetensors file"),
                            ("full", "transformer does not load as a SD3Transformer2DModel")):
        args = progrpo.parse_args(short_run(tiny_dir) + ["--output_dir", str(tmp_path / "out"),
                                                         "--eval_only", str(tmp_path / folder)])
        with pytest.raises(progrpo.RunError, match=message) as error:
            progrpo.main(args)
        assert "\n" not in str(error.value)


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path, tiny_dir):
    """--resume_from_checkpoint latest with no checkpoint yet starts fresh with a one-line notice (requeue scripts)."""
    args = progrpo.parse_args(short_run(tiny_dir) + ["--num_epochs", "1", "--output_dir", str(tmp_path),
                                                     "--resume_from_checkpoint", "latest"])
    assert len(progrpo.main(args)) == 1


def test_progrpo_py_copied_alone_trains_and_refuses_what_needs_its_siblings(tmp_path, tiny_dir):
    """progrpo.py copied alone into a fork (no progrpo_kernels/, no progrpo_outputs.py, no repro/) trains, writes
    metrics.jsonl, prune_audit.jsonl and weights, and no pictures; --report_to and --eval_only, which need
    progrpo_outputs.py, are one line and exit 2 before any model loads."""
    fork = tmp_path / "fork"
    fork.mkdir()
    (fork / "progrpo.py").write_text((ROOT / "progrpo.py").read_text())
    reward = "def Brightness(device):\n    return lambda images, prompts: images.mean((1, 2, 3))\n"
    (fork / "brightness.py").write_text(reward)
    flags = [flag if flag != "repro.tiny.Colour" else "brightness.Brightness" for flag in short_run(tiny_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}

    def run(*extra):
        return subprocess.run([sys.executable, "progrpo.py", *flags, "--num_epochs", "2", "--eval_every", "1", *extra],
                              capture_output=True, text=True, env=env, cwd=fork, timeout=300)

    result = run("--output_dir", "out")
    assert result.returncode == 0, result.stderr[-2000:]
    out = fork / "out"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 and (out / "prune_audit.jsonl").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "eval/reward_mean" in (out / "metrics.jsonl").read_text()  # it evaluates, without a grid
    assert not list(out.rglob("*.png")) and not (out / "config.json").exists()
    for extra in (["--report_to", "tensorboard"], ["--eval_only", "out"]):
        result = run("--output_dir", "again", *extra)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(lines) == 1 and "need progrpo_outputs.py" in lines[0], result.stderr
        assert "Traceback" not in result.stderr and "Loading pipeline" not in result.stderr + result.stdout


def test_progrpo_outputs_that_cannot_import_is_not_mistaken_for_absent(tmp_path):
    """A progrpo_outputs.py beside progrpo.py whose own import fails (a package missing) stops the import with
    that package's name, instead of a run that silently writes no pictures."""
    (tmp_path / "progrpo.py").write_text((ROOT / "progrpo.py").read_text())
    (tmp_path / "progrpo_outputs.py").write_text("import a_package_this_machine_lacks\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", "import progrpo"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "No module named 'a_package_this_machine_lacks'" in result.stderr


def top_level_names(root):
    """The modules and packages a `python` started in root finds there first: *.py files and __init__.py folders."""
    return {p.stem for p in root.glob("*.py")} | {p.parent.name for p in root.glob("*/__init__.py")}


def test_no_top_level_name_shadows_an_installed_distribution(tmp_path):
    """No module or package at the repository root has the top-level name of an installed distribution (ours
    would be imported instead of it, as kernels/ once shadowed Hugging Face's `kernels`); a planted one is caught."""
    import importlib.metadata

    provided = importlib.metadata.packages_distributions()  # top-level name -> distributions providing it
    assert not {name: provided[name] for name in top_level_names(ROOT) if name in provided}
    (tmp_path / "numpy").mkdir()  # the check itself sees a clash: a folder named like an installed package
    (tmp_path / "numpy" / "__init__.py").write_text("")
    assert "numpy" in top_level_names(tmp_path) and "numpy" in provided


def test_the_suite_runs_on_the_lock():
    """Under `bash run.sh test` every distribution requirements.lock pins is installed at exactly that version, and
    every package requirements.txt asks for is pinned: what CI passes is what a fresh clone installs."""
    import importlib.metadata
    import re

    if not os.environ.get("PROGRPO_LOCK"):
        pytest.skip("not run through `bash run.sh test` (an environment of your own need not match the lock)")
    pinned = dict(line.split("==") for line in Path(ROOT / os.environ["PROGRPO_LOCK"]).read_text().splitlines()
                  if line and not line.startswith("#"))
    norm = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pinned.items()}
    wanted = [re.match(r"[A-Za-z0-9_.-]+", line)[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert [name for name in wanted if re.sub(r"[-_.]+", "-", name).lower() not in norm] == []
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version.split("+")[0]
                 for d in importlib.metadata.distributions()}
    assert {name: (version, installed.get(name)) for name, version in norm.items()
            if installed.get(name) != version} == {}


def test_hub_kernels_imports_as_itself_from_the_repository_root():
    """From the repository root `import kernels` is Hugging Face's package (transformers >= 5.25 imports it),
    and progrpo still uses its own fused kernels, progrpo_kernels/."""
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5.25)")
    code = "import kernels, progrpo; print(kernels.__file__); print(progrpo.progrpo_kernels.__file__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    theirs, ours = (Path(line).resolve() for line in result.stdout.split())
    assert theirs.parent.parent.name in ("site-packages", "dist-packages"), theirs  # an installed distribution
    assert ours.parent == ROOT / "progrpo_kernels"


# ---------------------------------------------------------------------------------------------------
# Scale and long runs: ranks, resume, EMA, gradient checkpointing
# ---------------------------------------------------------------------------------------------------

def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_two_gloo_ranks_sample_what_one_process_samples(tmp_path, tiny_dir):
    """torchrun with 2 gloo ranks: weights equal across ranks after every step; trajectories equal 1 process's.

    Equal up to fp32 round-off, not bit for bit: the ranks run with one thread each and the single process
    with the machine's threads, and BLAS sums in an order set by the thread count and the CPU. 1e-5 is ~100x
    the round-off of these tiny models' outputs, and far below the rewards' spread (~1e-2)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    flags = short_run(tiny_dir) + ["--num_epochs", "2"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "progrpo.py"), *flags, "--output_dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(*flags, "--output_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    metrics_two = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [m["dist/weight_spread"] for m in metrics_two] == [0.0, 0.0]  # the same weights on both ranks
    audit_one, audit_two = (read_jsonl(tmp_path / "one" / "prune_audit.jsonl"),
                            read_jsonl(tmp_path / "two" / "prune_audit.jsonl"))
    key = [(a["epoch"], a["index"], a["prompt"]) for a in audit_one]
    assert key == [(a["epoch"], a["index"], a["prompt"]) for a in audit_two]
    for a, b in zip(audit_one, audit_two):
        assert torch.allclose(torch.tensor(a["final"]), torch.tensor(b["final"]), rtol=0, atol=1e-5)
        for c, d in zip(a["checkpoints"], b["checkpoints"]):
            assert torch.allclose(torch.tensor(c["proxy"]), torch.tensor(d["proxy"]), rtol=0, atol=1e-5)
    assert metrics_two[0]["perf/nfe_sample"] == read_jsonl(tmp_path / "one" / "metrics.jsonl")[0]["perf/nfe_sample"]


def test_global_std_is_one_std_over_every_ranks_rewards(tmp_path, tiny_dir):
    """--global_std under torchrun (2 gloo ranks): each rank's advantages use one std over the whole epoch's rewards,
    all ranks' (Flow-GRPO), so they equal one process's and the formula on every final reward of the epoch; the
    std of one rank's rewards alone would differ."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    flags = short_run(tiny_dir) + ["--num_epochs", "1", "--global_std"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "progrpo.py"), *flags, "--output_dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(*flags, "--output_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    audit_one, audit_two = (read_jsonl(tmp_path / run / "prune_audit.jsonl") for run in ("one", "two"))
    adv_two = torch.tensor([a["adv"] for a in audit_two])  # (B, K), prompts in epoch order
    # the rewards agree to fp32 round-off (see the test above: 1e-5 at most), divided here by a std of ~0.05
    torch.testing.assert_close(adv_two, torch.tensor([a["adv"] for a in audit_one]), rtol=0, atol=2e-4)
    final = torch.tensor([a["final"] for a in audit_two])
    ids = torch.arange(4).repeat_interleave(3)
    expected = progrpo.group_advantages(final.flatten(), ids, global_std=True).view(4, 3)
    torch.testing.assert_close(adv_two, expected, rtol=0, atol=1e-5)
    per_rank = torch.cat([progrpo.group_advantages(final[r::2].flatten(), ids[:6], global_std=True).view(2, 3)
                          for r in (0, 1)])[[0, 2, 1, 3]]  # rank r holds prompts r, r + 2
    assert (per_rank - expected).abs().max() > 1e-2


def without_times(metrics):
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics]


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_resume_is_bit_exact_and_survives_a_killed_save(tmp_path, tiny_dir, precision):
    """4 epochs straight == 2, stop, resume to 4 (metrics and weights), in fp32 and in fp16 with the loss scaler's
    state; a torn save falls back; a corrupt one is refused. Same process, same shapes: bit for bit."""
    from safetensors.torch import load_file

    args = progrpo.parse_args(short_run(tiny_dir) + ["--num_epochs", "4", "--checkpointing_steps", "2", "--ema",
                                                     "--mixed_precision", precision])
    straight = progrpo.main(dataclasses.replace(args, output_dir=str(tmp_path / "straight")))
    first = progrpo.main(dataclasses.replace(args, num_epochs=2, output_dir=str(tmp_path / "resumed")))
    assert without_times(first) == without_times(straight[:2])
    if precision == "fp16":
        state = torch.load(tmp_path / "resumed" / "checkpoint-2" / "training_state.pt", weights_only=True)
        assert state["scaler"]["scale"] > 0  # the scaler's state is in the checkpoint
    # a run killed while writing checkpoint-3 leaves only the temporary file: 'latest' skips it
    (tmp_path / "resumed" / "checkpoint-3").mkdir()
    (tmp_path / "resumed" / "checkpoint-3" / "training_state.pt.tmp").write_bytes(b"\x80\x02truncated")
    resumed = progrpo.main(dataclasses.replace(args, output_dir=str(tmp_path / "resumed"),
                                               resume_from_checkpoint="latest"))
    assert without_times(resumed) == without_times(straight)
    assert without_times(read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == without_times(straight)
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if precision == "fp16":
        return
    # a truncated complete-looking checkpoint is refused with its name
    state = tmp_path / "resumed" / "checkpoint-4" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(progrpo.RunError, match="checkpoint-4/training_state.pt' is unreadable"):
        progrpo.main(dataclasses.replace(args, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint="latest"))
    with pytest.raises(progrpo.RunError, match="does not match"):  # another LoRA rank
        progrpo.main(dataclasses.replace(args, rank=8, output_dir=str(tmp_path / "resumed"),
                                         resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2")))


class RunsCode:
    """A pickled object whose unpickling makes a folder: code that a shared checkpoint could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_checkpoint_holding_an_object_is_refused_without_running_it(tmp_path):
    """training_state.pt loads as data only: one holding a pickled object is refused with one line naming it, and
    the object's code never runs (loading the same file as code does run it: the test can fail)."""
    folder, marker = tmp_path / "checkpoint-1", tmp_path / "ran"
    folder.mkdir()
    torch.save(dict(epoch=1, history=[RunsCode(marker)]), folder / "training_state.pt")
    with pytest.raises(progrpo.RunError, match="checkpoint-1/training_state.pt' is unreadable") as error:
        progrpo.load_checkpoint(folder, None, [], None, None, None)
    assert "\n" not in str(error.value) and not marker.exists()
    torch.load(folder / "training_state.pt", weights_only=False)
    assert marker.is_dir()


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_nonfinite_loss_leaves_the_weights_and_stops_before_saving(monkeypatch, tmp_path, tiny_dir, precision):
    """A loss that is NaN at every step, in fp32, bf16 and fp16: every optimiser step is skipped and counted, the
    LoRA weights stay bit-identical to their initialisation, and a one-line RunError stops the run before that
    epoch's checkpoint and the final weights. fp16's scaler first backs off (here from 4: skips at 4 and 2 are its
    search for a scale, and checkpoint-1 holds the untouched weights); steps skipped at scale 1 fail."""
    nan_loss(monkeypatch)
    make_params, initial = progrpo.trainable_parameters, []

    def keep_initial(pipe, args):
        params = make_params(pipe, args)
        initial.extend((p, p.detach().clone()) for p in params)
        return params

    monkeypatch.setattr(progrpo, "trainable_parameters", keep_initial)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=4.0))
    out = tmp_path / "out"
    flags = ["--num_epochs", "3", "--checkpointing_steps", "1", "--updates_per_epoch", "2", "--mixed_precision",
             precision, "--output_dir", str(out)]  # 12 survivors in micro-batches of 3: two steps per epoch
    with pytest.raises(progrpo.RunError) as error:
        progrpo.main(progrpo.parse_args(short_run(tiny_dir) + flags))
    stop = 1 if precision == "fp16" else 0
    assert str(error.value).startswith(f"every optimiser step of epoch {stop} had an inf/NaN loss or gradient")
    assert "\n" not in str(error.value) and initial and all(torch.equal(p, p0) for p, p0 in initial)
    assert [m["policy/skipped_steps"] for m in read_jsonl(out / "metrics.jsonl")] == [2] * (stop + 1)
    assert sorted(d.name for d in out.glob("checkpoint-*")) == [f"checkpoint-{e + 1}" for e in range(stop)]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    if precision == "fp16":
        state = torch.load(out / "checkpoint-1" / "training_state.pt", weights_only=True)
        assert state["scaler"]["scale"] == 1.0  # halved at each skip: 4 -> 2 -> 1
        assert all(torch.equal(saved, p0) for saved, (_, p0) in zip(state["params"], initial))


NAN_LOSS_REWARD = """import math

import progrpo  # the running progrpo.py: it registers itself under this name for --reward code
from repro.tiny import Colour

clip_loss = progrpo.ppo_clip_loss


def nan_loss(*args):
    loss, ratio = clip_loss(*args)
    return loss * math.nan, ratio


progrpo.ppo_clip_loss = nan_loss
"""


def test_nonfinite_loss_on_the_command_line_is_one_line_and_exit_2(tmp_path, tiny_dir):
    """On the command line a loss that is NaN at every step (patched in by a --reward module) ends with one error
    line, exit code 2 and no traceback, and leaves no weights and no checkpoint."""
    (tmp_path / "nan_loss.py").write_text(NAN_LOSS_REWARD)
    out = tmp_path / "out"
    flags = ["--reward", "nan_loss.Colour", "--num_epochs", "1", "--checkpointing_steps", "1", "--output_dir", str(out)]
    result = run_cli(*short_run(tiny_dir), *flags, env={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "every optimiser step of epoch 0" in lines[0] and "Traceback" not in result.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "pytorch_lora_weights.safetensors").exists()


def test_ema_schedule_and_swap():
    """EMA follows Flow-GRPO's schedule (every 8 steps, decay min(0.9, (1+n)/(10+n))); ema_weights restores."""
    p = torch.nn.Parameter(torch.zeros(3))
    ema = [p.detach().clone()]
    for step in range(16):
        p.data.fill_(step + 1.0)
        progrpo.ema_update(ema, [p], step)
        if step == 7:
            assert torch.allclose(ema[0], torch.full((3,), 8.0 * (1 - 8 / 17)))  # d = (1 + 7) / (10 + 7)
    expected = 8.0 * (1 - 8 / 17) * (16 / 25) + 16.0 * (1 - 16 / 25)  # step 15: d = min(0.9, 16 / 25)
    assert torch.allclose(ema[0], torch.full((3,), expected))
    with progrpo.ema_weights([p], ema):
        assert torch.equal(p.data, ema[0])
    assert torch.equal(p.data, torch.full((3,), 16.0))


def test_gradient_checkpointing_changes_nothing(tiny):
    """--gradient_checkpointing gives the same losses and gradients as the plain backward."""
    pipe, params, prompts, text = tiny
    args = tiny_args()
    samples, _, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward, args, 5, [(2, 4), (4, 3)])
    adv = progrpo.group_advantages(samples["rewards"], samples["prompt_idx"])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        optimizer = torch.optim.SGD(params, lr=0.0)
        capture = []
        optimizer.step = lambda: capture.append([p.grad.clone() for p in params])
        info = progrpo.train_epoch(pipe, params, optimizer, NO_SCALER, samples, adv, text, args, 0)
        grads.append((info["loss"], capture[0]))
    pipe.transformer.disable_gradient_checkpointing()
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-7)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))


def test_run_outputs_tensorboard_model_card_checkpoint_limit_and_eval_only(tmp_path, tiny_dir):
    """A 3-epoch run with --report_to tensorboard leaves event files holding every metric and the eval grid, a
    config.json with flags, versions and commit, a model card with a loading snippet, at most
    --checkpoints_total_limit checkpoints; --eval_only on its weights reproduces its final eval reward."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    flags = short_run(tiny_dir) + ["--num_epochs", "3", "--eval_every", "2", "--checkpointing_steps", "1",
                                   "--checkpoints_total_limit", "2", "--report_to", "tensorboard"]
    history = progrpo.main(progrpo.parse_args(flags + ["--output_dir", str(out)]))
    events = EventAccumulator(str(out / "logs"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("reward/mean")] == pytest.approx([m["reward/mean"] for m in history])
    assert "policy/clipfrac" in events.Tags()["scalars"] and len(events.Images("eval/grid")) == 2  # epochs 0, 2
    assert "policy/advantages" in events.Tags()["histograms"]
    record = json.loads((out / "config.json").read_text())
    assert record["args"]["report_to"] == "tensorboard" and record["versions"]["torch"] == torch.__version__
    card = (out / "README.md").read_text()
    assert f"{history[-1]['eval/reward_mean']:.4f}" in card and f'pipe.load_lora_weights("{out}")' in card
    assert sorted(d.name for d in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    again = progrpo.main(progrpo.parse_args(flags + ["--output_dir", str(tmp_path / "eval"), "--eval_only", str(out)]))
    assert abs(again[0]["eval/reward_mean"] - history[-1]["eval/reward_mean"]) < 1e-5
    assert (tmp_path / "eval" / "eval_only.png").is_file() and not (tmp_path / "eval" / "metrics.jsonl").exists()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_cli_run_trains_and_reproduces_the_sampling_logprobs(tmp_path, tiny_dir, precision):
    """The CLI in fp16 (autocast + loss scaler) and bf16 on CPU: finite loss, a non-zero gradient norm within a factor
    2 of the fp32 run's, metrics that differ from it (the flag took effect); at --learning_rate 0 and clip range
    1e-4 the clip fraction is exactly 0 and the ratio 1 within 1e-5, although sampling and the update batch
    trajectories differently (--sample_batch_size 5, --train_batch_size 1)."""
    flags = short_run(tiny_dir) + ["--num_epochs", "1", "--clip_range", "1e-4", "--train_batch_size", "1",
                                   "--sample_batch_size", "5", "--decode_batch_size", "5", "--reward_batch_size", "5"]
    runs = {}
    for name, extra in (("fp32", ["--mixed_precision", "no"]), ("half", ["--mixed_precision", precision]),
                        ("dry", ["--mixed_precision", precision, "--learning_rate", "0"])):
        args = progrpo.parse_args(flags + extra + ["--output_dir", str(tmp_path / name)])
        runs[name] = progrpo.main(args)[0]
    half, fp32, dry = runs["half"], runs["fp32"], runs["dry"]
    assert math.isfinite(half["policy/loss"]) and 0 < half["policy/grad_norm"] < math.inf
    assert 0.5 < half["policy/grad_norm"] / fp32["policy/grad_norm"] < 2
    assert half["reward/mean"] != fp32["reward/mean"]  # the half-precision forward really ran
    assert dry["policy/clipfrac"] == 0 and abs(dry["policy/ratio_mean"] - 1) < 1e-5
    assert dry["policy/first_step_ratio_dev"] < 1e-5 and dry["policy/skipped_steps"] == 0
