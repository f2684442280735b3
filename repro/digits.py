"""A small pretrained text-to-image flow model of handwritten digits, and a learned reward for it.

Why. The CPU demo of progrpo.py fine-tunes a random-weight model against a colour statistic, which says
nothing about the paper's setting: a pretrained policy whose samples are mostly good (rewards cluster
near the group mean, the paper's Figure 1), a one-step projection half-way through denoising that
already shows what the image will be, and a learned reward model. This module builds that setting at a
size a laptop CPU trains in minutes, from scikit-learn's 1,797 handwritten digits (8x8, grey, 0..16).

What `python -m repro.digits make` builds (deterministic: bit for bit on one machine and thread count):
  1. The data. The digits, split once by a seeded permutation into a generator part (1,200 digits, the
     only ones the generator sees) and a scorer part (597: the reward model and the accuracy classifier
     are fitted on these only), so accuracy is measured by a model the generator never trained against.
  2. A fixed grey decoder: a diffusers AutoencoderTiny (no norm layers) with hand-set weights that turn
     an 8x8 one-channel latent into the 16x16 grey image it codes, with no per-image normalisation.
     Latent z codes pixel p in [0, 1] as z = 3 atanh((2p - 1) / 3): the decoder's built-in clamp
     3 tanh(z / 3) undoes it, so decode(encode-like latents) gives back the pixel values up to round-off.
  3. The generator: an SD3Transformer2DModel (SD3.5's layout: joint attention, RMS qk-norm, a dual
     attention block; 2x2 patches over the 8x8 latent) conditioned through progrpo's tiny offline text
     encoders (frozen, random, as build_tiny_pipeline makes them) on captions "a handwritten 7".
     Rectified-flow matching as SD3 trains: x_sigma = (1 - sigma) x0 + sigma noise, target v = noise - x0,
     sigma = shift(u) with u ~ logit-normal(0, 1) (SD3's default density) and the sampler's shift 3,
     10% of captions dropped to the empty prompt so classifier-free guidance works; an EMA is shipped.
  4. The reward model (DigitScorer): an MLP classifier of the ten digits, and per digit a probabilistic
     PCA density of the scorer part's digits of that class ("typicality": how prototypical a stroke is),
     standardised on the real digits of that class. reward = log p(d | x) + TYPICALITY_WEIGHT * t_d(x),
     d the prompt's digit: the classifier term is near 0 for most base samples (clustering) and the
     typicality term varies within each class and has room to rise (the class mean scores highest).
All of it is saved as a StableDiffusion3Pipeline folder (repro/digits/pipeline) that progrpo.py loads
with `--pretrained_model_name_or_path repro/digits/pipeline`, and the scorer as repro/digits/scorer.

Run:
  python -m repro.digits make            # rebuild the shipped weights (~10 min on 2 cores)
  python -m repro.digits eval            # base model: accuracy per digit, reward mean / spread, clustering
  bash run.sh                            # the demo: Pro-GRPO on this model with --reward repro.digits.DigitReward
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import progrpo

from repro import testbed

HERE = Path(__file__).resolve().parent / "digits"
PIPELINE_DIR, SCORER_DIR = HERE / "pipeline", HERE / "scorer"
RESOLUTION, LATENT_SIDE = 16, 8  # pixels; the decoder upsamples 2x, so one latent cell is one digit pixel
MAX_SEQUENCE_LENGTH = 24  # T5 tokens: "a handwritten 7" is 17 letter tokens (16 would cut the digit off)
GENERATOR_DIGITS = 1200  # of 1,797; the other 597 fit the reward model and the accuracy classifier
TYPICALITY_WEIGHT = 0.5


def caption(digit):
    return f"a handwritten {digit}"


def prompt_digits(prompts):
    """The digit each prompt asks for: its last character 0-9. A prompt without one is an error."""
    digits = []
    for p in prompts:
        found = re.findall(r"[0-9]", p)
        if not found:
            raise progrpo.RunError(f"the digit reward needs a digit 0-9 in every prompt; '{p}' has none")
        digits.append(int(found[-1]))
    return torch.tensor(digits)


# ----------------------------------------------------------------------------------------------------
# Data: the digits and their fixed split
# ----------------------------------------------------------------------------------------------------

def load_split(seed=0):
    """(pixels in [0, 1] as (N, 8, 8) fp32, labels (N,)) for the 'generator' and 'scorer' parts."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = torch.tensor(data.images, dtype=torch.float32) / 16  # 0..16 -> [0, 1]
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts = order[:GENERATOR_DIGITS], order[GENERATOR_DIGITS:]
    return {name: (pixels[idx], labels[idx]) for name, idx in zip(("generator", "scorer"), parts)}


def encode_pixels(pixels):
    """Pixels p in [0, 1], (N, 8, 8) -> raw latents z (N, 1, 8, 8) that the grey decoder maps back to p."""
    return 3 * torch.atanh((2 * pixels - 1) / 3).unsqueeze(1)


def image_pixels(images):
    """Decoded or real images (N, 3, H, W) in [0, 1] -> (N, 8, 8) grey digit pixels (mean over 2x2 cells)."""
    return F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), LATENT_SIDE).squeeze(1)


# ----------------------------------------------------------------------------------------------------
# The pipeline: a fixed grey decoder and an SD3 transformer with progrpo's tiny text encoders
# ----------------------------------------------------------------------------------------------------

def grey_decoder(shift_factor=0.0, scaling_factor=1.0):
    """AutoencoderTiny whose decoder maps a one-channel latent z to the grey image 3 tanh(z / 3), 2x upsampled.

    DecoderTiny computes conv_out(up(relu(conv_in(3 tanh(z / 3))))) * 2 - 1 and has no norm layers. Here
    conv_in splits u = 3 tanh(z / 3) into relu(u) and relu(-u), the upsampler copies pixels, the middle
    conv is the identity, and conv_out gives (relu(u) - relu(-u)) / 2 + 1/2 = (u + 1) / 2 on all three
    channels, so the decoder returns u and progrpo's decode returns u / 2 + 1/2 (clamped to [0, 1]).
    The encoder is unused (random): the generator learns latents, it never encodes images.
    """
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny(in_channels=3, out_channels=3, latent_channels=1, encoder_block_out_channels=(2, 2),
                          decoder_block_out_channels=(2, 2), num_encoder_blocks=(0, 0), num_decoder_blocks=(0, 0),
                          shift_factor=shift_factor, scaling_factor=scaling_factor)
    conv_in, conv_mid, conv_out = (m for m in vae.decoder.layers if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        for conv in (conv_in, conv_mid, conv_out):
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.zero_()
        conv_in.weight[0, 0, 1, 1], conv_in.weight[1, 0, 1, 1] = 1.0, -1.0
        conv_mid.weight[0, 0, 1, 1] = conv_mid.weight[1, 1, 1, 1] = 1.0
        conv_out.weight[:, 0, 1, 1], conv_out.weight[:, 1, 1, 1] = 0.5, -0.5
        conv_out.bias.fill_(0.5)
    return vae.eval().requires_grad_(False)


def build_pipeline(shift_factor, scaling_factor, num_layers=2, heads=2, seed=0):
    """The testbeds' tiny SD3 pipeline with a digit-sized transformer (one latent channel, 2x2 patches over 8x8)
    and the grey decoder."""
    vae = lambda: grey_decoder(shift_factor, scaling_factor)  # noqa: E731
    return testbed.build_pipeline(vae, LATENT_SIDE, 1, MAX_SEQUENCE_LENGTH, num_layers, heads, seed)


def sample_args(guidance_scale, batch_size=64):
    """The progrpo.Args fields that progrpo.sample_deterministic and encode_prompts read."""
    return testbed.sample_args(RESOLUTION, MAX_SEQUENCE_LENGTH, guidance_scale, batch_size)


# ----------------------------------------------------------------------------------------------------
# The reward model: a digit classifier and a per-digit typicality density, fitted on the scorer part
# ----------------------------------------------------------------------------------------------------

class DigitScorer(torch.nn.Module):
    """(N, 8, 8) pixels in [0, 1] and digits (N,) -> log p(digit | x) from an MLP, and the digit's typicality.

    Typicality t_d(x): the probabilistic-PCA log-density of x under digit d's real examples (top
    `components` directions, isotropic residual), standardised to mean 0 and std 1 on those examples.
    """

    def __init__(self, hidden=512, components=8):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
        self.register_buffer("mean", torch.zeros(10, 64))
        self.register_buffer("basis", torch.zeros(10, components, 64))  # orthonormal rows
        self.register_buffer("eigvals", torch.ones(10, components))
        self.register_buffer("resid_var", torch.ones(10))
        self.register_buffer("t_loc", torch.zeros(10))
        self.register_buffer("t_scale", torch.ones(10))

    def log_prob(self, pixels):
        return torch.log_softmax(self.mlp(pixels.flatten(1)), dim=-1)  # (N, 10)

    def raw_typicality(self, pixels, digits):
        d = pixels.flatten(1) - self.mean[digits]  # (N, 64)
        proj = torch.einsum("nkp,np->nk", self.basis[digits], d)  # (N, k) coordinates in the digit's subspace
        resid = (d.pow(2).sum(1) - proj.pow(2).sum(1)).clamp(min=0)  # squared distance off the subspace
        return -0.5 * ((proj.pow(2) / self.eigvals[digits]).sum(1) + resid / self.resid_var[digits])

    def typicality(self, pixels, digits):
        return (self.raw_typicality(pixels, digits) - self.t_loc[digits]) / self.t_scale[digits]

    def forward(self, pixels, digits):
        """(log p(d | x), t_d(x)), each (N,)."""
        return self.log_prob(pixels).gather(1, digits[:, None]).squeeze(1), self.typicality(pixels, digits)


def fit_scorer(pixels, labels, seed=0, steps=600):
    """Fits DigitScorer on real digits: the MLP by full-batch Adam (light pixel noise so generated digits,
    whose values are not the 17 levels of the data, are in distribution), the densities in closed form."""
    torch.manual_seed(seed)
    scorer = DigitScorer()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(scorer.mlp.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(steps):
        noisy = (pixels + 0.1 * torch.randn(pixels.shape, generator=g)).clamp(0, 1)
        loss = F.cross_entropy(scorer.mlp(noisy.flatten(1)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    k = scorer.basis.shape[1]
    with torch.no_grad():
        for d in range(10):
            x = pixels[labels == d].flatten(1).double()  # (n_d, 64)
            mu = x.mean(0)
            evals, evecs = torch.linalg.eigh(torch.cov((x - mu).T, correction=1))  # ascending
            scorer.mean[d], scorer.basis[d] = mu.float(), evecs[:, -k:].T.flip(0).float()
            scorer.eigvals[d] = evals[-k:].flip(0).clamp(min=1e-4).float()
            scorer.resid_var[d] = evals[:-k].clamp(min=0).mean().clamp(min=1e-4).float()
            raw = scorer.raw_typicality(pixels[labels == d], torch.full((len(x),), d))
            scorer.t_loc[d], scorer.t_scale[d] = raw.mean(), raw.std()
    return scorer.eval().requires_grad_(False)


def reward_from_scores(log_p, typicality):
    """The reward: log p(d | x) floored at -10 (a wrong digit is bad, an illegible one no worse than that),
    plus TYPICALITY_WEIGHT times the typicality clamped to [-5, 5]. In [-12.5, 2.5]."""
    return log_p.clamp(min=-10) + TYPICALITY_WEIGHT * typicality.clamp(-5, 5)


def load_scorer(directory=SCORER_DIR, device="cpu"):
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        raise progrpo.RunError(f"digit scorer weights not found in '{directory}'; "
                               "make them with `python -m repro.digits make`")
    config = json.loads((directory / "config.json").read_text())
    scorer = DigitScorer(**config)
    scorer.load_state_dict(load_file(directory / "model.safetensors"))
    return scorer.to(device).eval().requires_grad_(False)


def DigitReward(device):
    """The reward contract's factory: reward_fn(images, prompts) -> (N,) fp32 CPU tensor (see reward_from_scores)."""
    scorer = load_scorer(device=device)

    @torch.no_grad()
    def reward_fn(images, prompts):
        log_p, typicality = scorer(image_pixels(images.to(device)), prompt_digits(prompts).to(device))
        return reward_from_scores(log_p, typicality).float().cpu()

    return reward_fn


# ----------------------------------------------------------------------------------------------------
# Pretraining by flow matching, and the make script
# ----------------------------------------------------------------------------------------------------

def pretrain(pipe, pixels, labels, steps, batch_size=64, lr=2e-3, drop_caption=0.1, ema_decay=0.999, seed=0, log=print):
    """Rectified-flow matching (repro.testbed.pretrain) on (digit image, caption) pairs: x0 the latents of a
    batch of the digits, drawn with replacement. Leaves the EMA weights in the transformer."""
    vae = pipe.vae
    x0_all = (encode_pixels(pixels) - vae.config.shift_factor) * vae.config.scaling_factor  # (N, 1, 8, 8)

    def draw(g, n):
        idx = torch.randint(len(x0_all), (n,), generator=g)
        return x0_all[idx], labels[idx]

    return testbed.pretrain(pipe, [caption(d) for d in range(10)], draw, steps, MAX_SEQUENCE_LENGTH, batch_size, lr,
                            drop_caption, ema_decay, seed, log)


def make(out=HERE, steps=2000, scorer_steps=600, seed=0, log=print):
    """Builds the scorer and the pretrained pipeline from the digits and saves both under `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    split = load_split(seed)
    scorer = fit_scorer(*split["scorer"], seed=seed, steps=scorer_steps)
    gen_pixels, gen_labels = split["generator"]
    held_out_acc = (scorer.log_prob(gen_pixels).argmax(1) == gen_labels).float().mean().item()
    log(f"scorer: classifier accuracy {held_out_acc:.3f} on the {len(gen_labels)} generator digits it never saw")
    z = encode_pixels(gen_pixels)
    shift_factor, scaling_factor = round(z.mean().item(), 4), round(1 / z.std().item(), 4)  # unit-variance latents
    pipe = build_pipeline(shift_factor, scaling_factor, seed=seed)
    pretrain(pipe, gen_pixels, gen_labels, steps, seed=seed, log=log)
    (out / "scorer").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in scorer.state_dict().items()}, out / "scorer" / "model.safetensors")
    (out / "scorer" / "config.json").write_text(json.dumps(dict(hidden=scorer.mlp[0].out_features,
                                                                  components=scorer.basis.shape[1])) + "\n")
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    return pipe, scorer


# ----------------------------------------------------------------------------------------------------
# Measuring the base model: accuracy, reward spread, clustering
# ----------------------------------------------------------------------------------------------------

def base_samples(pipe, per_digit, guidance_scale, num_steps=10, seed=0):
    """ODE samples (progrpo.sample_deterministic) for `per_digit` prompts of each digit -> (images, digits)."""
    digits = torch.arange(10).repeat_interleave(per_digit)
    args = sample_args(guidance_scale)
    text = progrpo.encode_prompts(pipe, [caption(int(d)) for d in digits], MAX_SEQUENCE_LENGTH)
    return progrpo.sample_deterministic(pipe, text, args, num_steps, seed), digits


def accuracy(scorer, images, digits):
    """Share of images the classifier reads as their prompt's digit: overall and per digit."""
    right = scorer.log_prob(image_pixels(images)).argmax(1) == digits
    return right.float().mean().item(), [right[digits == d].float().mean().item() for d in range(10)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["make", "eval"])
    parser.add_argument("--out", default=str(HERE), help="folder for pipeline/ and scorer/ (make)")
    parser.add_argument("--steps", type=int, default=2000, help="pretraining steps (make)")
    parser.add_argument("--per_digit", type=int, default=50, help="ODE samples per digit (eval)")
    parser.add_argument("--guidance_scale", type=float, default=4.5, help="CFG scale of the samples (eval)")
    parser.add_argument("--eval_steps", type=int, default=10, help="ODE steps (eval)")
    args = parser.parse_args(argv)
    problems = [(getattr(args, name) < 1, f"--{name} must be at least 1 (got {getattr(args, name)})")
                for name in ("steps", "per_digit", "eval_steps")]
    out, cfg = Path(args.out), args.guidance_scale
    problems += [(not math.isfinite(cfg), f"--guidance_scale must be finite (got {cfg})"),
                 (out.exists() and not out.is_dir(), f"--out '{out}' is a file, not a folder")]
    progrpo.refuse(problems)
    if args.command == "make":
        make(args.out, args.steps)
        return
    scorer = load_scorer(Path(args.out) / "scorer")  # the small model first: a folder without it fails at once
    pipe = progrpo.load_pipeline(str(Path(args.out) / "pipeline"), torch.float32)
    images, digits = base_samples(pipe, args.per_digit, args.guidance_scale, args.eval_steps)
    acc, per_digit = accuracy(scorer, images, digits)
    print(f"accuracy {acc:.3f} over {len(digits)} samples; per digit "
          + " ".join(f"{d}:{a:.2f}" for d, a in enumerate(per_digit)))
    log_p, typ = scorer(image_pixels(images), digits)
    r = reward_from_scores(log_p, typ)
    print(f"reward mean {r.mean():.3f} std {r.std():.3f} | log p mean {log_p.mean():.3f} | "
          f"typicality mean {typ.mean():.3f} std {typ.std():.3f}")


if __name__ == "__main__":
    try:
        main()
    except progrpo.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
