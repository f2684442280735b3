"""Tests of the digits testbed (repro/digits.py): the shipped pipeline, its decoder, its reward, its accuracy."""

import pytest
import torch
import torch.nn.functional as F

import progrpo
from repro import digits

GUIDANCE = 4.5  # the demo's (progrpo's default --guidance_scale)


@pytest.fixture(scope="module")
def pipe():
    return progrpo.load_pipeline(str(digits.PIPELINE_DIR), torch.float32)


@pytest.fixture(scope="module")
def held_out():
    """Real digits the scorer never saw (the generator's part of the split), as 16x16 RGB images."""
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (requirements.txt)")
    pixels, labels = digits.load_split()["generator"]
    images = F.interpolate(pixels[:, None], scale_factor=2, mode="nearest").expand(-1, 3, -1, -1)
    return pixels, labels, images


def test_shipped_pipeline_loads_through_progrpo(pipe):
    """progrpo.load_pipeline takes the folder as it is: an SD3 pipeline with the grey AutoencoderTiny."""
    from diffusers import AutoencoderTiny, StableDiffusion3Pipeline

    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.vae, AutoencoderTiny)
    assert pipe.vae_scale_factor * digits.LATENT_SIDE == digits.RESOLUTION
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 1


def test_decoder_gives_back_pixel_values(pipe, held_out):
    """decode(encode-like latents) is the digit itself on all three channels: no per-image normalisation."""
    pixels, _, images = held_out
    cfg = pipe.vae.config
    x = (digits.encode_pixels(pixels) - cfg.shift_factor) * cfg.scaling_factor  # what the transformer generates
    decoded = progrpo.decode(pipe, x)
    assert decoded.shape == images.shape
    # fp32 round-off of a scale, shift, atanh / tanh pair and two convs on values of size 1: ~1e-7
    assert (decoded - images).abs().max().item() < 2e-6
    faint = digits.encode_pixels(pixels[:2] * 0.5)  # a faint digit must decode faint, not be rescaled to full range
    faint_image = progrpo.decode(pipe, (faint - cfg.shift_factor) * cfg.scaling_factor)
    assert (faint_image - images[:2] * 0.5).abs().max().item() < 2e-6


def test_digit_reward_contract_and_prompt_dependence(held_out):
    """DigitReward: (N,) fp32 CPU, finite, in its documented range, and the prompted digit scores higher."""
    _, labels, images = held_out
    images, labels = images[:300], labels[:300]
    reward_fn = digits.DigitReward("cpu")
    right = reward_fn(images, [digits.caption(int(d)) for d in labels])
    wrong = reward_fn(images, [digits.caption(int(d + 1) % 10) for d in labels])
    assert right.shape == (300,) and right.dtype == torch.float32 and right.device.type == "cpu"
    assert torch.isfinite(right).all() and right.min() >= -12.5 and right.max() <= 2.5
    assert (right > wrong).float().mean().item() > 0.95  # the classifier alone reads 97.7% of these right
    assert right.std().item() > 0.3  # real digits of one class are not all alike: the typicality term spreads


def test_digit_reward_needs_a_digit_in_the_prompt(held_out):
    with pytest.raises(progrpo.RunError, match="needs a digit"):
        digits.DigitReward("cpu")(held_out[2][:1], ["a handwritten letter"])


def test_base_model_draws_the_prompted_digit(pipe):
    """The pretrained model before any RL: >= 85% of 50 ODE samples (10 steps) classified as prompted."""
    images, prompted = digits.base_samples(pipe, per_digit=5, guidance_scale=GUIDANCE)
    acc, _ = digits.accuracy(digits.load_scorer(), images, prompted)
    assert acc >= 0.85


def test_make_is_deterministic(tmp_path):
    """Two runs of the make script (a few steps) write identical weight files."""
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (requirements.txt)")
    for run in ("a", "b"):
        digits.make(tmp_path / run, steps=3, scorer_steps=20, log=lambda message: None)
    for path in sorted((tmp_path / "a").rglob("*.safetensors")):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes(), path


def test_bad_flags_are_refused(tmp_path):
    """No samples per digit, a NaN guidance scale, an --out that is a file: one-line RunErrors before anything runs."""
    (tmp_path / "file").write_text("not a folder\n")
    for argv, message in ((["eval", "--per_digit", "0"], "--per_digit must be at least 1"),
                          (["eval", "--guidance_scale", "nan"], "--guidance_scale must be finite"),
                          (["make", "--out", str(tmp_path / "file")], "--out '.*file' is a file, not a folder")):
        with pytest.raises(progrpo.RunError, match=message):
            digits.main(argv)
