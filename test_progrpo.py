"""Tests for progrpo.py: CPU only, offline, tiny random-weight models of the real classes.

Each test says in its docstring the one property it pins.
"""

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import progrpo

ROOT = Path(__file__).resolve().parent
REFERENCE = ROOT.parent / "shared" / "reference" / "baseline_steps.pt"


def rel_close(ours, ref, tol=1e-5):
    """DESIGN.md's parity tolerance: |ours - ref| <= tol (1 + |ref|), elementwise."""
    return bool(((ours - ref).abs() <= tol * (1 + ref.abs())).all())


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.parent.is_dir():
        pytest.skip(f"reference vectors folder {REFERENCE.parent} is absent")
    return torch.load(REFERENCE)


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
    sched = progrpo.sampler_schedule(progrpo.build_tiny_pipeline("flow"), 10, "cpu")
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
    """project_x0_flow(x, v*, sigma) equals E[x0 | x_sigma] for the closed-form velocity."""
    x = torch.randn(64, 1, 2, 2) * 1.3
    for sigma in (0.9, 0.5, 0.1):
        v, e_x0 = gaussian_posterior(x, sigma)
        assert torch.allclose(progrpo.project_x0_flow(x, v, torch.full((64,), sigma)), e_x0, atol=1e-5)


def test_sde_sampler_recovers_gaussian_data():
    """Driven by the exact velocity, the Flow-GRPO SDE sampler ends at mean M and std S (200 steps, 40k samples)."""
    sched = progrpo.sampler_schedule(progrpo.build_tiny_pipeline("flow"), 200, "cpu")
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
    """ddim_step_with_logprob and project_x0_ddim reproduce DDPO's outputs on every ddim case."""
    for case in reference["ddim"]:
        prev, logp, mean, std = progrpo.ddim_step_with_logprob(
            case["model_output"], case["sample"], case["alpha_prod_t"], case["alpha_prod_t_prev"], case["eta"],
            prev_sample=case["prev_sample"])
        x0 = progrpo.project_x0_ddim(case["sample"], case["model_output"], case["alpha_prod_t"])
        assert rel_close(logp, case["log_prob"]) and rel_close(std, case["std_dev_t"]), case["step_index"]
        assert rel_close(x0, case["pred_original_sample"]), case["step_index"]


def test_ddim_schedule_matches_reference(reference):
    """SD-v1.4's DDIM schedule at T=50: timesteps 981..1 and the alphas (prev_t clamped at 0) of each case."""
    sched = progrpo.sampler_schedule(progrpo.build_tiny_pipeline("ddim"), 50, "cpu")
    assert torch.equal(sched["timesteps"], reference["ddim_timesteps"])
    for case in reference["ddim"]:
        i = case["step_index"]
        assert rel_close(sched["alpha_prod_t"][i], case["alpha_prod_t"][0]) and rel_close(sched["alpha_prod_t_prev"][i], case["alpha_prod_t_prev"][0])


def test_ddim_eta_zero_is_diffusers_deterministic_ddim():
    """eta = 0 gives no log-prob and, over all 50 steps, the same samples as diffusers' DDIMScheduler.step."""
    pipe = progrpo.build_tiny_pipeline("ddim")
    sched = progrpo.sampler_schedule(pipe, 50, "cpu")
    g = torch.Generator().manual_seed(0)
    x = ours = torch.randn(2, 4, 3, 3, generator=g)
    for i, t in enumerate(sched["timesteps"]):
        eps = torch.randn(2, 4, 3, 3, generator=g)
        ours, logp, _, _ = progrpo.sampler_step(sched, torch.full((2,), i), eps, ours, 0.0)
        x = pipe.scheduler.step(eps, t, x, eta=0.0).prev_sample
        assert logp is None and torch.allclose(ours, x, rtol=1e-5, atol=1e-5), i


def test_ddim_projection_inverts_forward_noising():
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps, projected with the true eps, gives back x0."""
    x0, eps, a = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.tensor([0.99, 0.5, 0.05])
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(progrpo.project_x0_ddim(x_t, eps, a), x0, atol=1e-5)


def test_ddim_sampler_recovers_gaussian_data():
    """Driven by the exact eps for Gaussian data, DDIM (eta 1, 500 steps) ends at the law of x at t = 0."""
    pipe = progrpo.build_tiny_pipeline("ddim")
    sched = progrpo.sampler_schedule(pipe, 500, "cpu")
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
    assert torch.allclose(adv, torch.tensor([-1, 1, 0, 0, -1, 1]) / (1 + 1e-4 / torch.tensor([1, 1, 1, 1, 2, 2])), atol=1e-6)
    global_adv = progrpo.group_advantages(r, ids, global_std=True)
    assert torch.allclose(global_adv, torch.tensor([-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]) / (r.std(correction=0) + 1e-4), atol=1e-6)
    assert progrpo.group_advantages(torch.tensor([0.0, 0, 0, 100]), torch.zeros(4), clip=1.5).max().item() == 1.5


def test_zero_variance_group_gives_zero_advantages():
    """A group whose rewards are all equal gets advantages exactly 0, never NaN."""
    adv = progrpo.group_advantages(torch.tensor([0.3, 0.3, 0.3, 1.0, 2.0]), torch.tensor([0, 0, 0, 1, 1]))
    assert torch.isfinite(adv).all() and torch.equal(adv[:3], torch.zeros(3))


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
# Rewards
# ---------------------------------------------------------------------------------------------------

def test_colour_reward_and_weighted_sum():
    """The demo reward prefers the prompt's colour; a weighted sum adds terms with their weights."""
    red, blue = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    red[:, 0], blue[:, 2] = 1.0, 1.0
    images, prompts = torch.cat([red, blue]), ["a red car", "a red car"]
    assert progrpo.colour_reward(images, prompts).tolist() == [1.0, -0.5]
    mixed = progrpo.build_reward("colour:2.0,jpeg_compressibility:0.5", "cpu")(images, prompts)
    expected = 2 * progrpo.colour_reward(images, prompts) - 0.5 * progrpo.jpeg_size_kb(images)
    assert torch.allclose(mixed, expected)


def test_jpeg_compressibility_prefers_flat_images():
    """A flat image compresses better (higher compressibility reward) than noise."""
    flat, noise = torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    r = progrpo.jpeg_compressibility(torch.cat([flat, noise]), ["", ""])
    assert r[0] > r[1] and torch.equal(progrpo.jpeg_incompressibility(torch.cat([flat, noise]), ["", ""]), -r)


def test_pickscore_loads_from_folder_and_scores(tmp_path):
    """PickScore's real loading code runs on a tiny random CLIP saved to a folder; score = scale * cos."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = progrpo._tiny_tokenizers()[0]
    text = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=len(tok),
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=224, patch_size=32)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(tmp_path)
    config = dict(crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True, resample=3, size=224,
                  image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])  # PickScore's
    CLIPProcessor(image_processor=CLIPImageProcessor(**config), tokenizer=tok).save_pretrained(tmp_path)
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    prompts = ["a red car", "a cat", "two dogs"]
    pickscore = progrpo.PickScore("cpu", model=str(tmp_path), processor=str(tmp_path))
    clipscore = progrpo.CLIPScore("cpu", model=str(tmp_path), processor=str(tmp_path))
    scores, cos = pickscore(images, prompts), clipscore(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # the same score from CLIPModel's own forward on our preprocessed pixels and the processor's tokens
    pixels = torch.nn.functional.interpolate(images, size=(224, 269), mode="bicubic", antialias=True).clamp(0, 1)[..., 22:246]
    mean, std = torch.tensor(config["image_mean"]).view(1, 3, 1, 1), torch.tensor(config["image_std"]).view(1, 3, 1, 1)
    tokens = pickscore.processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    logits = pickscore.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=(pixels - mean) / std).logits_per_image
    assert torch.allclose(scores, logits.diag(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(cos * pickscore.model.logit_scale.exp(), scores, rtol=1e-5)  # CLIP score: the plain cosine


# ---------------------------------------------------------------------------------------------------
# The tiny pipeline: sampling, pruning, update
# ---------------------------------------------------------------------------------------------------

def tiny_args(**overrides):
    base = dict(pretrained_model_name_or_path="tiny", resolution=16, num_steps=6, group_size=6, prune="2:4,4:3",
                prompts_per_epoch=2, sample_batch_size=5, decode_batch_size=4, train_batch_size=4, guidance_scale=4.5,
                max_sequence_length=16, reward="colour", updates_per_epoch=1, clip_range=1e-4, beta=0.01, rank=4, lora_alpha=8)
    return progrpo.Args(**{**base, **overrides})


@pytest.fixture(scope="module")
def tiny():
    pipe = progrpo.load_pipeline("tiny", torch.float32)
    params = progrpo.trainable_parameters(pipe, tiny_args())
    prompts = ["a red cat", "a blue dog"]
    return pipe, params, prompts, progrpo.encode_prompts(pipe, prompts, 16)


def test_tiny_pipeline_round_trips_through_from_pretrained(tmp_path):
    """The tiny pipeline saved to a folder loads back through the real from_pretrained path, same outputs."""
    pipe = progrpo.build_tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = progrpo.load_pipeline(str(tmp_path), torch.float32)
    args = tiny_args()
    out = [progrpo.sample_deterministic(p, progrpo.encode_prompts(p, ["a red cat"], 16), args, 4, seed=0) for p in (pipe, loaded)]
    assert torch.equal(out[0], out[1]) and out[0].std() > 0.05  # and the decoder really carries colour


def test_nfe_counts_every_transformer_call(tiny):
    """perf NFE equals the schedule's formula and the transformer really sees exactly that many trajectory-steps."""
    pipe, _, prompts, text = tiny
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[0] // 2), with_kwargs=True)
    try:
        args = tiny_args()
        schedule = progrpo.parse_prune_schedule(args.prune, args.num_steps, args.group_size)
        samples, stats, audit = progrpo.rollout(pipe, text, prompts, progrpo.colour_reward, args, 0, schedule)
    finally:
        hook.remove()
    expected = len(prompts) * sum(progrpo.live_counts(6, 6, schedule))  # 2 * (3*6 + 2*4 + 1*3) = 58
    assert stats["nfe"] == sum(seen) == expected == 58
    assert stats["decodes"] == stats["reward_calls"] == 2 * (6 + 4) + 2 * 3  # checkpoints + final
    assert samples["latents"].shape == (6, 7, 4, 8, 8) and samples["log_probs"].shape == (6, 6)
    assert [len(a["survivors"]) for a in audit] == [3, 3]


@pytest.mark.parametrize("batch_size", [1, 5])
def test_survivors_are_identical_to_unpruned_run(tiny, batch_size):
    """A survivor's latents, log-probs and reward equal the same member's in an unpruned run with the same seed.

    Bit for bit when each transformer call holds one trajectory; with mixed micro-batches the BLAS
    reduction order changes with the batch's other rows, so only float round-off (1e-6) may differ.
    """
    pipe, _, prompts, text = tiny
    args = tiny_args(sample_batch_size=batch_size, decode_batch_size=batch_size, reward_batch_size=batch_size)
    pruned, _, _ = progrpo.rollout(pipe, text, prompts, progrpo.colour_reward, args, 3, [(2, 4), (4, 3)])
    full, _, _ = progrpo.rollout(pipe, text, prompts, progrpo.colour_reward, dataclasses.replace(args, prune="none"), 3, [])
    rows = pruned["prompt_idx"] * args.group_size + pruned["member"]  # full run keeps every trajectory, in id order
    for key in ("latents", "log_probs", "rewards"):
        if batch_size == 1:
            assert torch.equal(pruned[key], full[key][rows]), key
        else:
            assert torch.allclose(pruned[key], full[key][rows], rtol=0, atol=1e-6), key


def test_static_ovf_keeps_max_variance_subset(tiny):
    """--ovf_after_sampling keeps, per prompt, the OVF subset of the true final rewards."""
    pipe, _, prompts, text = tiny
    args = tiny_args(prune="none", ovf_after_sampling=3)
    samples, stats, audit = progrpo.rollout(pipe, text, prompts, progrpo.colour_reward, args, 1, [])
    assert stats["nfe"] == 2 * 6 * 6 and len(samples["rewards"]) == 6
    full, _, _ = progrpo.rollout(pipe, text, prompts, progrpo.colour_reward, dataclasses.replace(args, ovf_after_sampling=0), 1, [])
    for p in range(2):
        assert audit[p]["survivors"] == progrpo.ovf_select(full["rewards"].view(2, 6)[p], 3).tolist()


def test_ratio_is_one_on_first_update_step(tiny):
    """With unchanged weights the recomputed log-probs equal the sampling ones: ratio 1 (CFG, micro-batches differ)."""
    pipe, params, prompts, text = tiny
    args = tiny_args(sample_batch_size=5, train_batch_size=4)  # different batch composition in sampling and update
    samples, _, _ = progrpo.rollout(pipe, text, prompts, progrpo.colour_reward, args, 0, [(2, 4), (4, 3)])
    adv = progrpo.group_advantages(samples["rewards"], samples["prompt_idx"])
    optimizer = torch.optim.SGD(params, lr=0.0)
    info = progrpo.train_epoch(pipe, params, optimizer, samples, adv, text, args, 0)
    assert (info["ratio"] - 1).abs().max() < 1e-5
    assert info["clipfrac"].max() == 0 and info["kl"].abs().max() < 1e-10


def test_update_math_is_the_same_without_kernels(monkeypatch):
    """With kernels/ absent, progrpo's own torch path gives the same log-probs, KL and gradients."""
    g = torch.Generator().manual_seed(0)
    v, v_ref, x, x_next = (torch.randn(3, 4, 5, 7, generator=g) for _ in range(4))
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.9, 0.5, 0.0])
    results = []
    sched = dict(sigma=sigma, sigma_next=sigma_next)
    for module in (progrpo.kernels, None):
        monkeypatch.setattr(progrpo, "kernels", module)
        v_ = v.clone().requires_grad_(True)
        logp, kl = progrpo.step_logprob(sched, torch.arange(3), v_, x, x_next, 0.7, v_ref)
        (logp.sum() + kl.sum()).backward()
        results.append((logp.detach(), kl.detach(), v_.grad))
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("full_finetune", [False, True])
def test_sd1_prunes_and_trains(tmp_path, full_finetune):
    """Tiny SD1.x: NFE equals the formula with two checkpoints, ratio 1 on the first step, weights change."""
    pipe = progrpo.load_pipeline("tiny-sd1", torch.float32)
    args = tiny_args(pretrained_model_name_or_path="tiny-sd1", num_steps=8, group_size=8, prune="4:6,6:3", noise_level=1.0,
                     guidance_scale=5.0, learning_rate=1e-2, full_finetune=full_finetune, beta=0.0 if full_finetune else 0.01)
    schedule = progrpo.parse_prune_schedule(args.prune, args.num_steps, args.group_size)
    params = progrpo.trainable_parameters(pipe, args)
    before = [p.detach().clone() for p in params]
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[0] // 2), with_kwargs=True)
    prompts = ["a red cat", "a blue dog"]
    text = progrpo.encode_prompts(pipe, prompts, 16)
    samples, stats, _ = progrpo.rollout(pipe, text, prompts, progrpo.colour_reward, args, 0, schedule)
    hook.remove()
    assert stats["nfe"] == sum(seen) == 2 * (5 * 8 + 2 * 6 + 1 * 3)
    adv = progrpo.group_advantages(samples["rewards"], samples["prompt_idx"])
    info = progrpo.train_epoch(pipe, params, torch.optim.AdamW(params, lr=args.learning_rate), samples, adv, text, args, 0)
    assert (info["ratio"][:int(8 * 0.99)] - 1).abs().max() < 1e-5  # the steps before the first optimiser step
    changed = sum(not torch.equal(b, p) for b, p in zip(before, params))
    assert changed == len(params) if not full_finetune else changed > 0.9 * len(params)
    progrpo.save_weights(pipe, tmp_path, full_finetune)
    if full_finetune:
        from diffusers import UNet2DConditionModel

        reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), pipe.unet.state_dict().values()))
    else:
        fresh = progrpo.load_pipeline("tiny-sd1", torch.float32)
        fresh.load_lora_weights(str(tmp_path))
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        assert torch.allclose(fresh.unet(x, t, text["embeds"][:1]).sample, pipe.unet(x, t, text["embeds"][:1]).sample, atol=1e-5)


def test_missing_optional_package_is_named(monkeypatch):
    """The HPSv2 reward without open_clip installed says which package to install, in one line."""
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(progrpo.RunError, match="pip install open_clip_torch"):
        progrpo.HPSv2("cpu")


def test_audit_finishes_every_pruned_trajectory(tiny):
    """--audit_fraction 1 finishes every pruned trajectory, untrained, with the final reward it has unpruned."""
    pipe, _, prompts, text = tiny
    args = tiny_args(sample_batch_size=1, decode_batch_size=1, reward_batch_size=1, audit_fraction=1.0)
    samples, stats, audit = progrpo.rollout(pipe, text, prompts, progrpo.colour_reward, args, 2, [(2, 4), (4, 3)])
    full, _, _ = progrpo.rollout(pipe, text, prompts, progrpo.colour_reward, dataclasses.replace(args, prune="none"), 2, [])
    assert stats["nfe"] == 58 and stats["audit_nfe"] == 2 * (2 * 3 + 1 * 1)  # 2 pruned at step 2 run 3 steps, 1 at step 4 runs 1
    assert len(samples["rewards"]) == 6  # the audited ones are not trained on
    for p, a in enumerate(audit):
        finals = {**dict(zip(a["survivors"], a["final"])), **a["audited"]}
        assert sorted(finals) == list(range(6))
        assert [finals[m] for m in range(6)] == full["rewards"].view(2, 6)[p].tolist()
        fidelity = progrpo.proxy_fidelity([a], 0)
        assert -1 <= fidelity["spearman"] <= 1 and fidelity["overlap"] is not None


def test_proxy_fidelity_by_hand():
    """Spearman, Kendall and kept-set overlap on a fixed case, against values computed by hand."""
    checkpoint = dict(step=2, members=[0, 1, 2, 3, 4], proxy=[0.1, 0.4, 0.2, 0.9, 0.5], kept=[0, 3])
    audit = [dict(checkpoints=[checkpoint], survivors=[0, 3], final=[1.0, 5.0], audited={1: 2.0, 2: 3.0, 4: 4.0})]
    # proxy ranks 0 2 1 4 3, final ranks 0 1 2 4 3: d^2 = 0+1+1+0+0 = 2, rho = 1 - 6*2/(5*24) = 0.9
    # 10 pairs, only (1, 2) discordant: tau = (9 - 1) / 10 = 0.8. Finals by member are 1, 2, 3, 5, 4: OVF keeps
    # the lowest and the highest (members 0 and 3), so the overlap with kept {0, 3} is 1
    f = progrpo.proxy_fidelity(audit, 0)
    assert f["spearman"] == pytest.approx(0.9) and f["kendall"] == pytest.approx(0.8) and f["overlap"] == 1.0
    audit[0]["checkpoints"][0]["kept"] = [0, 1]
    assert progrpo.proxy_fidelity(audit, 0)["overlap"] == 0.5
    assert progrpo.kendall([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / (2 * 3) ** 0.5)  # tau-b with a tie


def test_small_advantage_fraction():
    """The clustering measure counts |A| < delta within each group."""
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0, 5.0]])  # A = -1.41 -0.71 0 0.71 1.41; all 0
    assert progrpo.small_advantage_fraction(rewards, 0.5) == pytest.approx(6 / 10)
    assert progrpo.small_advantage_fraction(rewards, 0.75) == pytest.approx(8 / 10)


def test_nan_reward_stops_the_run_naming_the_prompt(tiny):
    """A reward that comes back NaN raises RunError naming the prompt instead of training on it."""
    pipe, _, prompts, text = tiny

    def nan_reward(images, ps):
        return torch.tensor([float("nan") if "blue" in p else 0.0 for p in ps])

    with pytest.raises(progrpo.RunError, match="a blue dog"):
        progrpo.rollout(pipe, text, prompts, nan_reward, tiny_args(), 0, [(2, 4), (4, 3)])


# ---------------------------------------------------------------------------------------------------
# End to end, and the command line
# ---------------------------------------------------------------------------------------------------

# The CPU demo of `bash run.sh`, shortened: 60 epochs take ~80 s on 2 cores
DEMO_ARGS = progrpo.Args(
    pretrained_model_name_or_path="tiny", prompts="demo", eval_prompts="demo", reward="colour", resolution=16,
    mixed_precision="no", max_sequence_length=16, num_epochs=60, prompts_per_epoch=6, group_size=16, prune="5:8,7:4",
    sample_batch_size=32, decode_batch_size=32, train_batch_size=8, eval_steps=10, eval_every=30, checkpointing_steps=1000,
    learning_rate=5e-3, clip_range=1e-2, beta=0.0)


def test_demo_trains_end_to_end(tmp_path):
    """A short demo run: finite losses, LoRA weights change and reload through diffusers, reward rises."""
    args = dataclasses.replace(DEMO_ARGS, output_dir=str(tmp_path))
    history = progrpo.main(args)
    assert all(math.isfinite(m["policy/loss"]) for m in history)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == args.num_epochs and lines[0]["perf/nfe_sample"] == args.prompts_per_epoch * 120
    audit = [json.loads(line) for line in (tmp_path / "prune_audit.jsonl").read_text().splitlines()]
    assert len(audit) == args.num_epochs * args.prompts_per_epoch and len(audit[0]["checkpoints"]) == 2
    assert (tmp_path / "reward_curve.png").is_file() and len(list((tmp_path / "samples").glob("*.png"))) >= 2
    means = torch.tensor([m["reward/mean"] for m in history])
    first, last = means[:10].mean().item(), means[-10:].mean().item()
    noise = means[:10].std().item() / math.sqrt(10)  # epoch-to-epoch noise of a 10-epoch average
    assert last - first > max(0.08, 6 * noise), (first, last, noise)
    # the saved LoRA loads into a fresh tiny pipeline through diffusers and reproduces the trained model:
    # its evaluation reward equals the one the run logged after its last update
    eval_prompts = progrpo.read_prompts("demo", held_out=True)[:args.num_eval_prompts]
    scores = []
    for lora in (str(tmp_path), None):
        pipe = progrpo.load_pipeline("tiny", torch.float32)
        if lora:
            pipe.load_lora_weights(lora)
        images = progrpo.sample_deterministic(pipe, progrpo.encode_prompts(pipe, eval_prompts, 16), args, args.eval_steps, args.seed)
        scores.append(progrpo.colour_reward(images, eval_prompts).mean().item())
    assert abs(scores[0] - history[-1]["eval/reward_mean"]) < 1e-5
    assert scores[0] > scores[1] + 0.05  # and it is better than the base model


def run_cli(*flags, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "progrpo.py"), *flags], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("flags, message", [
    (["--prune", "7:24,5:12"], "strictly increasing"),
    (["--prune", "5:24,7:24"], "strictly decrease"),
    (["--prune", "5:24,7:1"], "at least 2 survivors"),
    (["--group_size", "1", "--prune", "none"], "--group_size must be at least 2"),
    (["--reward", "beauty"], "unknown reward 'beauty'"),
    (["--prompts", "no_such_prompts.txt"], "prompts file 'no_such_prompts.txt' not found"),
    (["--prompts", "EMPTY"], "has no prompts"),
    (["--pretrained_model_name_or_path", "./no/such/model", "--prompts", "demo", "--eval_prompts", "demo", "--reward", "colour"],
     "model folder './no/such/model' does not exist"),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, flags, message):
    """Each bad input gives one line on stderr that says what is wrong, exit code 2, and no traceback."""
    (tmp_path / "EMPTY").write_text("\n  \n")
    result = run_cli(*flags, "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------
# Scale and long runs: ranks, resume, EMA, gradient checkpointing
# ---------------------------------------------------------------------------------------------------

SHORT_RUN = ["--pretrained_model_name_or_path", "tiny", "--prompts", "demo", "--eval_prompts", "demo", "--reward", "colour",
             "--resolution", "16", "--mixed_precision", "no", "--max_sequence_length", "16", "--prompts_per_epoch", "4",
             "--group_size", "6", "--num_steps", "6", "--prune", "2:4,4:3", "--sample_batch_size", "1", "--decode_batch_size", "1",
             "--reward_batch_size", "1", "--train_batch_size", "3", "--updates_per_epoch", "1", "--eval_every", "0",
             "--learning_rate", "1e-2", "--clip_range", "1e-2", "--rank", "4", "--lora_alpha", "8"]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_two_gloo_ranks_sample_what_one_process_samples(tmp_path):
    """torchrun with 2 gloo ranks: weights equal across ranks after every step; trajectories equal 1 process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    flags = SHORT_RUN + ["--num_epochs", "2"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "progrpo.py"), *flags, "--output_dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(*flags, "--output_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    metrics_two = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [m["dist/weight_spread"] for m in metrics_two] == [0.0, 0.0]  # one optimiser step per epoch
    audit_one, audit_two = read_jsonl(tmp_path / "one" / "prune_audit.jsonl"), read_jsonl(tmp_path / "two" / "prune_audit.jsonl")
    assert [(a["epoch"], a["index"], a["prompt"]) for a in audit_one] == [(a["epoch"], a["index"], a["prompt"]) for a in audit_two]
    for a, b in zip(audit_one, audit_two):
        assert a["survivors"] == b["survivors"] and [c["kept"] for c in a["checkpoints"]] == [c["kept"] for c in b["checkpoints"]]
        if a["epoch"] == 0:  # same weights, one trajectory per call: bit for bit
            assert a["final"] == b["final"] and [c["proxy"] for c in a["checkpoints"]] == [c["proxy"] for c in b["checkpoints"]]
        else:  # after one update whose gradient was summed in another order: float round-off
            assert torch.allclose(torch.tensor(a["final"]), torch.tensor(b["final"]), atol=1e-5)
    assert metrics_two[0]["perf/nfe_sample"] == read_jsonl(tmp_path / "one" / "metrics.jsonl")[0]["perf/nfe_sample"]


def without_times(metrics):
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics]


def test_resume_is_bit_exact_and_survives_a_killed_save(tmp_path):
    """4 epochs straight == 2, stop, resume to 4 (metrics and weights); a torn save falls back; a corrupt one is refused."""
    from safetensors.torch import load_file

    args = progrpo.parse_args(SHORT_RUN + ["--num_epochs", "4", "--checkpointing_steps", "2", "--ema"])
    straight = progrpo.main(dataclasses.replace(args, output_dir=str(tmp_path / "straight")))
    first = progrpo.main(dataclasses.replace(args, num_epochs=2, output_dir=str(tmp_path / "resumed")))
    assert without_times(first) == without_times(straight[:2])
    # a run killed while writing checkpoint-3 leaves only the temporary file: 'latest' skips it
    (tmp_path / "resumed" / "checkpoint-3").mkdir()
    (tmp_path / "resumed" / "checkpoint-3" / "training_state.pt.tmp").write_bytes(b"\x80\x02truncated")
    resumed = progrpo.main(dataclasses.replace(args, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint="latest"))
    assert without_times(resumed) == without_times(straight)
    assert without_times(read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == without_times(straight)
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a truncated complete-looking checkpoint is refused with its name
    state = tmp_path / "resumed" / "checkpoint-4" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(progrpo.RunError, match="checkpoint-4/training_state.pt' is unreadable"):
        progrpo.main(dataclasses.replace(args, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint="latest"))
    with pytest.raises(progrpo.RunError, match="does not match"):  # another LoRA rank
        progrpo.main(dataclasses.replace(args, rank=8, output_dir=str(tmp_path / "resumed"),
                                         resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2")))


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
    samples, _, _ = progrpo.rollout(pipe, text, prompts, progrpo.colour_reward, args, 5, [(2, 4), (4, 3)])
    adv = progrpo.group_advantages(samples["rewards"], samples["prompt_idx"])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        optimizer = torch.optim.SGD(params, lr=0.0)
        capture = []
        optimizer.step = lambda: capture.append([p.grad.clone() for p in params])
        info = progrpo.train_epoch(pipe, params, optimizer, samples, adv, text, args, 0)
        grads.append((info["loss"], capture[0]))
    pipe.transformer.disable_gradient_checkpointing()
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-7)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))


# ---------------------------------------------------------------------------------------------------
# Compute accounting and the matched-compute comparison
# ---------------------------------------------------------------------------------------------------

def test_cpu_attention_is_counted():
    """The CPU attention kernel, which torch's counter does not know, counts 4 b h s^2 d like the GPU ones."""
    q = torch.randn(2, 3, 10, 8)
    assert progrpo.count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)[1] == 4 * 2 * 3 * 10 * 10 * 8


def test_sampling_and_update_flops_are_per_call_times_counts(tiny):
    """FLOPs counted over a whole rollout and a whole update = the schedule's counts x per-call FLOPs: no hidden calls."""
    pipe, params, prompts, text = tiny
    args = tiny_args()
    per_call = progrpo.call_flops(pipe, progrpo.colour_reward, text, prompts[0], args)
    schedule = progrpo.parse_prune_schedule(args.prune, args.num_steps, args.group_size)
    (samples, stats, _), counted = progrpo.count_flops(progrpo.rollout, pipe, text, prompts, progrpo.colour_reward, args, 0, schedule)
    nfe = len(prompts) * sum(progrpo.live_counts(args.num_steps, args.group_size, schedule))  # 2 * (3*6 + 2*4 + 1*3) = 58
    assert per_call["model"] > 0 and per_call["decode"] > 0 and per_call["reward"] == 0  # the colour reward has no matmul
    assert counted - stats["decodes"] * per_call["decode"] == nfe * per_call["model"]
    epoch = progrpo.epoch_flops(per_call, args, schedule)
    assert counted == epoch["sampling"] + epoch["checkpoints"] + epoch["final"] and epoch["nfe"] * 2 == nfe == 58
    adv = progrpo.group_advantages(samples["rewards"], samples["prompt_idx"])
    optimizer = torch.optim.SGD(params, lr=0.0)  # the weights' values do not change FLOPs
    _, counted = progrpo.count_flops(progrpo.train_epoch, pipe, params, optimizer, samples, adv, text, args, 0)
    assert per_call["model"] < per_call["train"] < 3 * per_call["model"] and per_call["reference"] < per_call["model"]
    assert counted == epoch["update"] == 2 * 3 * 5 * (per_call["train"] + per_call["reference"])


def test_flops_table_builds_for_the_real_architectures():
    """SD3.5-M and SD-v1.4 on meta, offline: the paper's per-image costs, its NFE counts, its ordering and scale."""
    real = progrpo.preset_flops(ROOT / "configs")
    TERA = 1e12
    assert {n: r["nfe"] for n, r in real.items()} == {"sd35": 360, "sd35-flash": 200, "sd35-baseline": 240, "sd14": 1880, "sd14-baseline": 800}
    pc = real["sd35"]["per_call"]
    assert abs(pc["decode"] / TERA / progrpo.PAPER_DECODE_TFLOPS - 1) < 0.03  # the SD3 VAE decoder at 512 px: 2.51 vs 2.49
    assert abs(pc["reward_image"] / TERA / progrpo.PAPER_REWARD_TFLOPS - 1) < 0.03  # CLIP-H's image tower: 0.335 vs 0.34
    total = {n: r["total"] / TERA for n, r in real.items()}
    assert total["sd35-baseline"] > total["sd35"] > total["sd35-flash"]
    # what runs (LoRA backward ~1 forward) is 0.44-0.48 of Table 4; the 6N-rule update is within a factor 2
    assert all(0.4 < total[n] / progrpo.PAPER_TFLOPS[n] < 1 for n in progrpo.PAPER_TFLOPS)
    variants = progrpo.accounting_variants(real)
    full = next(v for label, v in variants.items() if label.startswith("update = 3 forwards"))
    assert all(0.5 < full[n] / TERA / progrpo.PAPER_TFLOPS[n] < 2 for n in progrpo.PAPER_TFLOPS)
    assert any(all(abs(v[n] / TERA / progrpo.PAPER_TFLOPS[n] - 1) < 0.1 for n in progrpo.PAPER_TFLOPS) for v in variants.values())
    table = progrpo.flops_table(real)
    assert all(f"| {n} |" in table for n in real) and "335,627" in table


def test_max_flops_stops_at_the_budget(tmp_path):
    """--max_flops stops after the first epoch whose cumulative FLOPs reach the budget, and evaluates there."""
    args = progrpo.parse_args(SHORT_RUN + ["--num_epochs", "1", "--eval_every", "100"])
    per_epoch = progrpo.main(dataclasses.replace(args, output_dir=str(tmp_path / "one")))[0]["perf/flops"]
    history = progrpo.main(dataclasses.replace(args, num_epochs=50, max_flops=2.5 * per_epoch, output_dir=str(tmp_path / "budget")))
    assert len(history) == 3 and history[-1]["perf/flops_cumulative"] == 3 * per_epoch and "eval/reward_mean" in history[-1]


def test_comparison_harness_runs(tmp_path):
    """`run.sh compare` in miniature (1 seed, one epoch each): four methods, a report and its plot."""
    args = dataclasses.replace(DEMO_ARGS, compare=True, compare_seeds=1, max_flops=1.0, prompts_per_epoch=2, eval_every=1,
                               output_dir=str(tmp_path))
    progrpo.main(args)
    report = (tmp_path / "comparison.md").read_text()
    assert all(f"| {name} | 1 |" in report for name in progrpo.COMPARE_METHODS) and (tmp_path / "comparison.png").is_file()
