"""A small pretrained text-to-image flow model of coloured shapes with compositional prompts, and its checker.

Why. On the digits testbed (repro/digits.py) the paper's premise does not hold: a one-step projection half-way
through denoising barely predicts the final reward, and rewards do not cluster. Real text-to-image models fix
the semantics of an image (what, how many, which colour, where) early in denoising and its details late, and
GenEval-style rewards, which count satisfied constraints, are discrete and cluster. This module builds that
setting at CPU size: prompts in the spirit of GenEval ("two red circles", "a blue square left of a yellow
triangle"), drawn procedurally on a 16 x 16 canvas, and a reward that a program computes by checking each
constraint of the prompt on the image.

The prompts (a grammar of known words; compositions of them are held out, never words):
  single    "a red circle"                          colour x shape (12)
  count     "two blue squares", "three ..."          count x colour x shape (24)
  pair      "a red circle and a blue square"         two different objects (132 ordered)
  position  "a red circle left of a blue square"     two different objects and left of / right of / above /
                                                     below (528)
Held out (make writes them to eval.txt, the rest to train.txt): 6 of the 24 count prompts, 20% of the 66
unordered object pairs (both orders), and 20% of the (unordered pair, axis) layouts of the position prompts
(all four phrasings of one layout: "A left of B", "B right of A", "B left of A", "A right of B"). Every
single-object prompt is trained: they are the vocabulary. make also writes pool.txt, the first six compositional
prompts of train.txt (`bash run.sh compare shapes-pool`), and pool_eval.txt, each of them 16 times.

What `python -m repro.shapes make` builds (deterministic: bit for bit on one machine and thread count):
  1. The data, drawn on the fly from a seeded generator: each object a circle, square or upward triangle of
     side 4.5-6 pixels at a random place (4x supersampled, so edges are anti-aliased), in one of four colours
     on black, every two objects at least GAP pixels apart; a relation's objects are apart along its axis and
     more apart along it than across it.
  2. A fixed colour decoder: a diffusers AutoencoderTiny (no norm layers) with hand-set weights that turn a
     3-channel 16 x 16 latent into the 32 x 32 RGB image it codes (pixels copied 2 x 2), as the digits decoder
     does for grey: latent z codes a channel value p in [0, 1] as z = 3 atanh((2p - 1) / 3).
  3. The generator: an SD3Transformer2DModel (SD3.5's layout: joint attention, RMS qk-norm, a dual attention
     block; 2x2 patches over the 16 x 16 latent) conditioned through progrpo's tiny frozen random text encoders,
     trained by rectified-flow matching as the digits model is (logit-normal sigmas with the sampler's shift 3,
     10% empty captions for guidance, an EMA shipped); 8,000 AdamW steps of 32 drawings, category-balanced.
  4. The reward (ShapesReward), a program, the same for training and evaluation: it finds the objects in the
     image (each pixel's nearest palette colour, 4-connected components, the shape whose drawing matches the
     component best, none if no shape is close: a blob; centroids) and checks each constraint of the prompt
     (see `constraints`). reward = the share of satisfied constraints: k / 4 for one kind of object, k / 7 for a
     pair, k / 8 with a relation, discrete and clustered as GenEval's per-prompt score is, with no clamp.
     `Cleanliness` is an optional smooth term (1 for an image of palette colours and their anti-aliased edges)
     for a weighted sum, `--reward repro.shapes.ShapesReward:1,repro.shapes.Cleanliness:0.01`: it breaks ties
     within a group, but by a detail decided late, so its ranks are what mid-trajectory proxies predict worst.
All of it is saved as a StableDiffusion3Pipeline folder (repro/shapes/pipeline) that progrpo.py loads with
`--pretrained_model_name_or_path repro/shapes/pipeline --resolution 32 --max_sequence_length 45`.

Run:
  python -m repro.shapes make            # rebuild the shipped weights and prompt files (~28 min on 1 core)
  python -m repro.shapes eval            # base model: accuracy per category, held out and trained (~3 min)
  python -m repro.shapes spread          # what a training group can teach: constraints met by none/all/some (~30 s)
  python progrpo.py ... --reward repro.shapes.ShapesReward --prompts repro/shapes/train.txt \\
      --eval_prompts repro/shapes/eval.txt
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import progrpo

from repro import testbed

HERE = Path(__file__).resolve().parent / "shapes"
PIPELINE_DIR = HERE / "pipeline"
CANVAS, RESOLUTION = 16, 32  # canvas pixels per side; the decoder copies each into 2 x 2 image pixels
MAX_SEQUENCE_LENGTH = 45  # T5 letter tokens of the longest prompt, "a green triangle right of a yellow triangle"

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.7, 0.1), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.8, 0.1)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {"a": 1, "two": 2, "three": 3}
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}  # (axis: 0 rows 1 columns,
# sign of the first object's centroid minus the second's along it)
CATEGORIES = ("single", "count", "pair", "position")

SIZE_RANGE = (4.5, 6.0)  # an object's side (its bounding box), canvas pixels
GAP = 1.5  # bounding boxes at least this far apart along some axis: objects never touch
SUPERSAMPLE = 4
MIN_AREA = 4  # a connected component smaller than this (pixels) is noise, not an object
MAX_SHAPE_ERROR = 0.5  # an object farther than this from every shape's drawing (L1 / area) is a blob, no shape:
# the data's objects are within 0.03 of their own shape and 0.15 or more from the others; the shipped model's
# single objects are within 0.1-0.5 of theirs, the blobs of a model 300 steps into pretraining ~0.55
RELATION_MARGIN = 1.0  # a relation holds when the centroids are this far apart along its axis, in the right order
POOL, POOL_SAMPLES = 6, 16  # `compare shapes-pool`: training prompts revisited every epoch; eval samples of each
CLEAN_SCALE = 0.05  # cleanliness = exp(-mean off-palette residual / CLEAN_SCALE)


# ----------------------------------------------------------------------------------------------------
# Prompts: a small grammar, its parser, and the held-out split
# ----------------------------------------------------------------------------------------------------
# A prompt's spec is (objects, relation): objects a tuple of (count, colour, shape), relation None or a key of
# RELATIONS relating objects[0] to objects[1].

def object_phrase(count, colour, shape):
    number = {1: "a", 2: "two", 3: "three"}[count]
    return f"{number} {colour} {shape}{'s' if count > 1 else ''}"


def caption(spec):
    """(objects, relation) -> the prompt text."""
    objects, relation = spec
    phrases = [object_phrase(*o) for o in objects]
    return phrases[0] if len(phrases) == 1 else f" {relation or 'and'} ".join(phrases)


_OBJECT = rf"({'|'.join(NUMBERS)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})(s?)"
_PROMPT = re.compile(rf"^{_OBJECT}(?: (and|{'|'.join(RELATIONS)}) {_OBJECT})?$")


def parse_prompt(text):
    """The prompt text -> (objects, relation); a prompt outside the grammar is a RunError that says what is allowed."""
    m = _PROMPT.match(" ".join(text.lower().split()))
    found = [] if m is None else [(NUMBERS[m[i]], m[i + 1], m[i + 2], m[i + 3]) for i in (1, 6) if m[i]]
    plural_right = all((count > 1) == (s == "s") for count, _, _, s in found)
    if not found or not plural_right or len(found) == 2 and any(count > 1 for count, *_ in found):
        raise progrpo.RunError(f"the shapes reward cannot read '{text}': prompts are 'a red circle', 'two blue "
                               "squares', 'a red circle and a blue square' or 'a red circle left of (right of, "
                               "above, below) a blue square'")
    return tuple(o[:3] for o in found), m[5] if m[5] in RELATIONS else None


def category(spec):
    """'single', 'count', 'pair' or 'position'."""
    objects, relation = spec
    if relation:
        return "position"
    if len(objects) == 2:
        return "pair"
    return "single" if objects[0][0] == 1 else "count"


def all_specs():
    """Every prompt of the grammar, by category (single counts one; pairs and relations of two different objects)."""
    kinds = [(c, s) for s in SHAPES for c in COLOURS]
    pairs = [(a, b) for a in kinds for b in kinds if a != b]
    return dict(single=[(((1, *k),), None) for k in kinds],
                count=[(((n, *k),), None) for n in (2, 3) for k in kinds],
                pair=[(((1, *a), (1, *b)), None) for a, b in pairs],
                position=[(((1, *a), (1, *b)), r) for a, b in pairs for r in RELATIONS])


def held_out_key(spec):
    """What a held-out composition is: the count prompt itself; a pair's unordered objects; a position prompt's
    unordered objects and axis (so 'A left of B' and 'B right of A', one layout, are held out together)."""
    objects, relation = spec
    kind = category(spec)
    if kind in ("single", "count"):
        return spec
    unordered = tuple(sorted(objects))
    return (unordered, RELATIONS[relation][0]) if relation else unordered


def split_specs(seed=0, held_out_share=0.2, held_out_counts=6):
    """(train, held_out): dicts category -> specs. The held-out keys are drawn by one seeded permutation per
    category; no training prompt shares a key with a held-out one."""
    g = torch.Generator().manual_seed(seed)
    train, held = {}, {}
    for kind, specs in all_specs().items():
        keys = sorted({held_out_key(s) for s in specs}, key=repr)
        n = 0 if kind == "single" else held_out_counts if kind == "count" else round(held_out_share * len(keys))
        chosen = {keys[i] for i in torch.randperm(len(keys), generator=g)[:n].tolist()}
        held[kind] = [s for s in specs if held_out_key(s) in chosen]
        train[kind] = [s for s in specs if held_out_key(s) not in chosen]
    return train, held


# ----------------------------------------------------------------------------------------------------
# Data: drawing a prompt's shapes
# ----------------------------------------------------------------------------------------------------

def shape_mask(shape, cy, cx, size):
    """Coverage in [0, 1] of each canvas pixel by the shape (side `size`, centred at (cy, cx)): (CANVAS, CANVAS)."""
    sub = (np.arange(CANVAS * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sub-pixel centres
    y, x = sub[:, None] - cy, sub[None, :] - cx
    h = size / 2
    if shape == "square":
        inside = (np.abs(y) <= h) & (np.abs(x) <= h)
    elif shape == "circle":
        inside = y**2 + x**2 <= h**2
    else:  # an upward triangle: apex at the top, base at the bottom, as wide as it is tall
        inside = (y >= -h) & (y <= h) & (np.abs(x) <= (y + h) / 2)
    return inside.reshape(CANVAS, SUPERSAMPLE, CANVAS, SUPERSAMPLE).mean(axis=(1, 3))


def place(sizes, relation, rng, tries=100):
    """Centres (cy, cx) for objects of these sizes, one at a time, each uniform over where it may go: inside the
    canvas, GAP apart from every object before it along some axis; with a relation, the second object apart from
    the first along its axis, in its order, and farther along it than across. A dead end starts over."""
    def fits(c, s, placed):
        for k, (d, sd) in enumerate(placed):
            if max(abs(c[a] - d[a]) - (s + sd) / 2 for a in (0, 1)) < GAP:
                return False
            if relation and k == 0:
                axis, sign = RELATIONS[relation]
                along, across = sign * (d[axis] - c[axis]), abs(d[1 - axis] - c[1 - axis])
                if along - (s + sd) / 2 < GAP or along <= across:
                    return False
        return True

    while True:
        placed = []
        for s in sizes:
            for _ in range(tries):
                c = tuple(rng.uniform(s / 2 + 0.5, CANVAS - s / 2 - 0.5, size=2).tolist())
                if fits(c, s, placed):
                    placed.append((c, s))
                    break
            else:
                break
        if len(placed) == len(sizes):
            return [c for c, _ in placed]


def render(spec, rng):
    """One image of the prompt: (3, CANVAS, CANVAS) fp32 in [0, 1], black background."""
    objects, relation = spec
    kinds = [(colour, shape) for count, colour, shape in objects for _ in range(count)]
    sizes = rng.uniform(*SIZE_RANGE, size=len(kinds)).tolist()
    image = np.zeros((3, CANVAS, CANVAS))
    for (colour, shape), size, (cy, cx) in zip(kinds, sizes, place(sizes, relation, rng)):
        image += shape_mask(shape, cy, cx, size)[None] * np.array(COLOURS[colour])[:, None, None]
    return torch.from_numpy(image).float()


def render_batch(specs, seed):
    """Images of the specs, (N, 3, CANVAS, CANVAS), from one seeded generator."""
    rng = np.random.default_rng(seed)
    return torch.stack([render(s, rng) for s in specs])


# ----------------------------------------------------------------------------------------------------
# The checker: objects in an image, constraints of a prompt, the reward
# ----------------------------------------------------------------------------------------------------

PALETTE = torch.tensor(list(COLOURS.values()))  # (4, 3)


def canvas_pixels(images):
    """Decoded or rendered images (N, 3, H, W) in [0, 1] -> (N, 3, CANVAS, CANVAS): the mean of each pixel's cell."""
    return F.adaptive_avg_pool2d(images.float(), CANVAS)


def palette_fit(pixels):
    """Each pixel as coverage a of its nearest palette colour over black: (colour index, a, residual), each
    (N, CANVAS, CANVAS). a = <p, c> / <c, c> clipped to [0, 1]; residual = |p - a c|, 0 for a clean image."""
    p = pixels.permute(0, 2, 3, 1)[..., None, :]  # (N, H, W, 1, 3)
    a = ((p * PALETTE).sum(-1) / PALETTE.pow(2).sum(-1)).clamp(0, 1)  # (N, H, W, 4)
    residual = (p - a[..., None] * PALETTE).norm(dim=-1)  # (N, H, W, 4)
    best = residual.argmin(-1)
    return best, a.gather(-1, best[..., None])[..., 0], residual.gather(-1, best[..., None])[..., 0]


SIDE_FROM_AREA = {"circle": math.sqrt(4 / math.pi), "square": 1.0, "triangle": math.sqrt(2)}  # side / sqrt(area)
CENTROID_BELOW_CENTRE = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}  # x side: a triangle's mass sits low


def classify_shape(coverage):
    """The shape whose drawing best matches an object's coverage (CANVAS, CANVAS), zero off the object: each shape
    drawn with the object's area and centroid, the one of least L1 difference wins. Returns (shape, difference /
    area), the difference 0 for a clean drawing."""
    area = coverage.sum()
    ys, xs = np.mgrid[:CANVAS, :CANVAS] + 0.5
    cy, cx = (coverage * ys).sum() / area, (coverage * xs).sum() / area
    errors = {}
    for shape in SHAPES:
        side = SIDE_FROM_AREA[shape] * math.sqrt(area)
        drawn = shape_mask(shape, cy - CENTROID_BELOW_CENTRE[shape] * side, cx, side)
        errors[shape] = np.abs(coverage - drawn).sum() / area
    shape = min(errors, key=errors.get)
    return shape, errors[shape]


def neighbours(x, fill):
    """The four 4-connected neighbours of every pixel of x (N, H, W), `fill` off the canvas: (4, N, H, W)."""
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    return torch.stack([padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]])


def components(colour_map, foreground):
    """Connected components: each foreground pixel labelled with the least flat index in its 4-connected region
    of one colour, -1 off the foreground; (N, H, W) int64. Labels spread to same-colour neighbours until still."""
    big = colour_map.numel()
    labels = torch.where(foreground, torch.arange(big).view(colour_map.shape), big)
    same = neighbours(colour_map, -1) == colour_map
    while True:
        spread = torch.where(same, neighbours(labels, big), big).amin(0)
        new = torch.where(foreground, torch.minimum(labels, spread), big)
        if torch.equal(new, labels):
            return torch.where(foreground, labels, -1)
        labels = new


def find_objects(images):
    """Objects in each image: lists of (colour, shape, cy, cx) with the centroid in canvas pixels, shape None for
    a blob that is no shape (MAX_SHAPE_ERROR): it counts as an object, but as none that a prompt asks for.
    A pixel belongs to its nearest palette colour where it covers at least half the pixel; an object is a
    4-connected component of one colour with at least MIN_AREA pixels, its coverage taken over the component
    and the pixels of that colour next to it (its anti-aliased edge)."""
    best, a, _ = palette_fit(canvas_pixels(images))
    labels = components(best, a >= 0.5)
    found = []
    for n in range(len(images)):
        objects = []
        for j in labels[n].unique().tolist():  # increasing: objects in the order of their first pixel, row-major
            component = labels[n] == j
            if j < 0 or component.sum() < MIN_AREA:
                continue
            k = int(best[n][component][0])  # the component's one colour
            edge = neighbours(component[None], False).any(0)[0] | component  # with the pixels next to it
            shape, error = classify_shape(torch.where(edge & (best[n] == k), a[n], 0.0).double().numpy())
            centroid = component.nonzero().double().mean(0) + 0.5  # (cy, cx): pixel centres are at + 0.5
            objects.append((list(COLOURS)[k], shape if error <= MAX_SHAPE_ERROR else None, *centroid.tolist()))
        found.append(objects)
    return found


def constraints(spec, objects):
    """The prompt's constraints checked on an image's objects: a dict name -> bool, in the prompt's order.
    Per object asked for: `what` (an object of its shape, any colour), `colour` (one of its shape and colour),
    `count` (exactly as many of both as asked); then `nothing else` (as many objects as asked in all) and for a
    relation `where` (some pair of the two kinds has centroids RELATION_MARGIN apart along its axis, in order)."""
    asked, relation = spec
    checks = {}
    for i, (count, colour, shape) in enumerate(asked):
        checks[f"what {i}"] = any(s == shape for _, s, _, _ in objects)
        checks[f"colour {i}"] = any((c, s) == (colour, shape) for c, s, _, _ in objects)
        checks[f"count {i}"] = sum((c, s) == (colour, shape) for c, s, _, _ in objects) == count
    checks["nothing else"] = len(objects) == sum(count for count, _, _ in asked)
    if relation:
        axis, sign = RELATIONS[relation]
        first = [o[2:] for o in objects if o[:2] == asked[0][1:]]
        second = [o[2:] for o in objects if o[:2] == asked[1][1:]]
        checks["where"] = any(sign * (a[axis] - b[axis]) >= RELATION_MARGIN for a in first for b in second)
    return checks


def cleanliness(images):
    """exp(-mean residual / CLEAN_SCALE) per image, (N,): 1 when every pixel is a palette colour over black (the
    anti-aliased edges of the data included), smoothly less for off-palette colour."""
    return torch.exp(-palette_fit(canvas_pixels(images.cpu()))[2].mean(dim=(1, 2)) / CLEAN_SCALE)


def score(images, prompts):
    """(the satisfied share of each image's constraints (N,) fp32, the per-image constraint dicts)."""
    specs = [parse_prompt(p) for p in prompts]
    checks = [constraints(s, o) for s, o in zip(specs, find_objects(images.cpu()))]
    return torch.tensor([sum(c.values()) / len(c) for c in checks]), checks


def ShapesReward(device):
    """The reward contract's factory: reward_fn(images, prompts) -> (N,) fp32 CPU tensor, the share of the prompt's
    constraints the image satisfies. It loads nothing: the checker is a program."""

    @torch.no_grad()
    def reward_fn(images, prompts):
        return score(images, prompts)[0]

    return reward_fn


def Cleanliness(device):
    """The optional smooth term as a reward factory, for weighted sums with ShapesReward; it ignores the prompts."""

    @torch.no_grad()
    def reward_fn(images, prompts):
        return cleanliness(images).float()

    return reward_fn


# ----------------------------------------------------------------------------------------------------
# The pipeline: a fixed colour decoder and an SD3 transformer with progrpo's tiny text encoders
# ----------------------------------------------------------------------------------------------------

def encode_pixels(pixels):
    """Channel values p in [0, 1], (N, 3, CANVAS, CANVAS) -> raw latents z that the colour decoder maps back to p."""
    return 3 * torch.atanh((2 * pixels - 1) / 3)


def colour_decoder(shift_factor=0.0, scaling_factor=1.0):
    """AutoencoderTiny whose decoder maps a 3-channel latent z to the RGB image 3 tanh(z / 3), 2x upsampled.

    The digits' grey decoder (repro.digits.grey_decoder) once per channel: DecoderTiny computes
    conv_out(up(relu(conv_in(u)))) * 2 - 1 with u = 3 tanh(z / 3); conv_in splits each channel c into relu(u_c)
    and relu(-u_c), the upsampler copies pixels, the middle conv is the identity, and conv_out gives
    (relu(u_c) - relu(-u_c)) / 2 + 1/2 on channel c, so progrpo's decode returns u / 2 + 1/2. The encoder is unused.
    """
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny(in_channels=3, out_channels=3, latent_channels=3, encoder_block_out_channels=(6, 6),
                          decoder_block_out_channels=(6, 6), num_encoder_blocks=(0, 0), num_decoder_blocks=(0, 0),
                          shift_factor=shift_factor, scaling_factor=scaling_factor)
    conv_in, conv_mid, conv_out = (m for m in vae.decoder.layers if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        for conv in (conv_in, conv_mid, conv_out):
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.zero_()
        for c in range(3):
            conv_in.weight[2 * c, c, 1, 1], conv_in.weight[2 * c + 1, c, 1, 1] = 1.0, -1.0
            conv_mid.weight[2 * c, 2 * c, 1, 1] = conv_mid.weight[2 * c + 1, 2 * c + 1, 1, 1] = 1.0
            conv_out.weight[c, 2 * c, 1, 1], conv_out.weight[c, 2 * c + 1, 1, 1] = 0.5, -0.5
        conv_out.bias.fill_(0.5)
    return vae.eval().requires_grad_(False)


def build_pipeline(shift_factor, scaling_factor, num_layers=4, heads=2, seed=0):
    """The testbeds' tiny SD3 pipeline with a canvas-sized transformer (three latent channels, 2x2 patches over
    16 x 16) and the colour decoder."""
    vae = lambda: colour_decoder(shift_factor, scaling_factor)  # noqa: E731
    return testbed.build_pipeline(vae, CANVAS, 3, MAX_SEQUENCE_LENGTH, num_layers, heads, seed)


def sample_args(guidance_scale, batch_size=64):
    """The progrpo.Args fields that progrpo.sample_deterministic and encode_prompts read."""
    return testbed.sample_args(RESOLUTION, MAX_SEQUENCE_LENGTH, guidance_scale, batch_size)


# ----------------------------------------------------------------------------------------------------
# Pretraining by flow matching, and the make script
# ----------------------------------------------------------------------------------------------------

def training_batch(train, rng, batch_size):
    """A batch of (category-balanced) training specs: a category uniformly, then one of its training prompts."""
    kinds = [k for k in CATEGORIES if train[k]]
    return [train[kinds[c]][rng.integers(len(train[kinds[c]]))] for c in rng.integers(len(kinds), size=batch_size)]


def pretrain(pipe, train, steps, batch_size=32, lr=2e-3, drop_caption=0.1, ema_decay=0.999, seed=0, log=print):
    """Rectified-flow matching (repro.testbed.pretrain) on freshly drawn (image, caption) pairs: each batch
    category-balanced (training_batch), drawn from a seeded numpy generator. Leaves the EMA in the transformer."""
    vae = pipe.vae
    specs = [s for k in CATEGORIES for s in train[k]]
    row = {s: i for i, s in enumerate(specs)}
    rng = np.random.default_rng(seed)

    def draw(g, n):
        batch = training_batch(train, rng, n)
        x0 = (encode_pixels(torch.stack([render(s, rng) for s in batch])) - vae.config.shift_factor) \
            * vae.config.scaling_factor  # (n, 3, CANVAS, CANVAS)
        return x0, torch.tensor([row[s] for s in batch])

    return testbed.pretrain(pipe, [caption(s) for s in specs], draw, steps, MAX_SEQUENCE_LENGTH, batch_size, lr,
                            drop_caption, ema_decay, seed, log)


def write_prompts(path, specs, seed=0):
    """Prompts one a line, interleaved across categories (each in a seeded order), so the first N cover all four.
    Returns the lines."""
    g = torch.Generator().manual_seed(seed)
    queues = [[specs[k][i] for i in torch.randperm(len(specs[k]), generator=g).tolist()] for k in CATEGORIES]
    lines = [caption(q[i]) for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    Path(path).write_text("\n".join(lines) + "\n")
    return lines


def write_pool(out, train_lines):
    """The fixed pool of `bash run.sh compare shapes-pool`: the first POOL compositional prompts of train.txt (two
    count, two pair, two position prompts), to pool.txt; and each of them POOL_SAMPLES times, to pool_eval.txt, so
    an evaluation draws that many ODE samples of every pool prompt, each from its own noise."""
    pool = [line for line in train_lines if category(parse_prompt(line)) != "single"][:POOL]
    Path(out, "pool.txt").write_text("\n".join(pool) + "\n")
    Path(out, "pool_eval.txt").write_text("".join(f"{line}\n" * POOL_SAMPLES for line in pool))


def make(out=HERE, steps=8000, seed=0, log=print):
    """Builds the pretrained pipeline from drawings of the training prompts; saves it and the prompt files."""
    out = Path(out)
    train, held = split_specs(seed)
    specs = [s for k in CATEGORIES for s in train[k]]
    z = encode_pixels(render_batch([specs[i % len(specs)] for i in range(2048)], seed + 1))
    shift_factor, scaling_factor = round(z.mean().item(), 4), round(1 / z.std().item(), 4)  # unit-variance latents
    pipe = build_pipeline(shift_factor, scaling_factor, seed=seed)
    pretrain(pipe, train, steps, seed=seed, log=log)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    write_pool(out, write_prompts(out / "train.txt", train, seed))
    write_prompts(out / "eval.txt", held, seed)  # held-out compositions only (no single-object prompt is)
    return pipe


# ----------------------------------------------------------------------------------------------------
# Measuring the base model: accuracy per category, held out and trained; the rewards
# ----------------------------------------------------------------------------------------------------

def base_samples(pipe, prompts, guidance_scale, num_steps=10, seed=0):
    """ODE samples (progrpo.sample_deterministic), one per prompt: (N, 3, RESOLUTION, RESOLUTION)."""
    text = progrpo.encode_prompts(pipe, prompts, MAX_SEQUENCE_LENGTH)
    return progrpo.sample_deterministic(pipe, text, sample_args(guidance_scale), num_steps, seed)


def evaluate(pipe, specs, guidance_scale, per_prompt=1, num_steps=10, seed=0):
    """ODE samples of the specs (dict category -> specs; `per_prompt` each) scored by the checker. Returns (table,
    rewards, constraint dicts): table category -> (accuracy: the share of samples satisfying every constraint,
    the mean reward, samples)."""
    prompts = [caption(s) for k in CATEGORIES for s in specs[k] for _ in range(per_prompt)]
    kinds = [k for k in CATEGORIES for s in specs[k] for _ in range(per_prompt)]
    images = torch.cat([base_samples(pipe, prompts[i:i + 256], guidance_scale, num_steps, seed + i)
                        for i in range(0, len(prompts), 256)])
    satisfied, checks = score(images, prompts)
    table = {}
    for k in CATEGORIES:
        rows = torch.tensor([kind == k for kind in kinds])
        if rows.any():
            table[k] = ((satisfied[rows] == 1).float().mean().item(), satisfied[rows].mean().item(), int(rows.sum()))
    return table, satisfied, checks


def constraint_spread(pipe, num_prompts=40, group_size=16, seed=0):
    """What a group can teach: training's SDE groups (progrpo.rollout at progrpo's defaults: noise 0.7, CFG 4.5,
    10 steps) for the first `num_prompts` of training's epoch-0 draw, as `repro.premise shapes` measures them.
    A constraint met by none or by all of a group's members gives every member the same share of it, so no
    group-relative advantage can move it. Returns the shares of (prompt, constraint) met by none, all, some."""
    args = progrpo.Args(resolution=RESOLUTION, max_sequence_length=MAX_SEQUENCE_LENGTH, group_size=group_size,
                        prune="none", mixed_precision="no", sample_batch_size=48, decode_batch_size=48, seed=seed,
                        reward="repro.shapes.ShapesReward")
    train = progrpo.read_prompts(str(HERE / "train.txt"))
    g = torch.Generator().manual_seed(progrpo.trajectory_seed(seed, 0, "prompts", 0))  # progrpo.main's draw
    prompts = [train[i] for i in torch.randperm(len(train), generator=g)[:num_prompts].tolist()]
    text = progrpo.encode_prompts(pipe, prompts, MAX_SEQUENCE_LENGTH)
    reward_fn = progrpo.build_reward(args.reward, torch.device("cpu"))
    with torch.no_grad():
        samples, _, _ = progrpo.rollout(pipe, text, prompts, reward_fn, args, 0, [])
        images = progrpo.decode(pipe, samples["latents"][:, -1])
    _, checks = score(images, [prompts[p] for p in samples["prompt_idx"].tolist()])
    groups = [checks[i:i + group_size] for i in range(0, len(checks), group_size)]
    met = [[c[k] for c in group] for group in groups for k in group[0]]  # one list of G bools per constraint
    never, always = sum(not any(m) for m in met) / len(met), sum(all(m) for m in met) / len(met)
    return dict(never=never, always=always, some=1 - never - always, constraints=len(met))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["make", "eval", "spread"])
    parser.add_argument("--out", default=str(HERE),
                        help="folder for pipeline/, train.txt, eval.txt, pool.txt and pool_eval.txt (make)")
    parser.add_argument("--steps", type=int, default=8000, help="pretraining steps (make)")
    parser.add_argument("--per_prompt", type=int, default=2, help="ODE samples per prompt (eval)")
    parser.add_argument("--guidance_scale", type=float, default=4.5, help="CFG scale of the samples (eval)")
    parser.add_argument("--eval_steps", type=int, default=10, help="ODE steps (eval)")
    args = parser.parse_args(argv)
    problems = [(getattr(args, name) < 1, f"--{name} must be at least 1 (got {getattr(args, name)})")
                for name in ("steps", "per_prompt", "eval_steps")]
    out, cfg = Path(args.out), args.guidance_scale
    problems += [(not math.isfinite(cfg), f"--guidance_scale must be finite (got {cfg})"),
                 (out.exists() and not out.is_dir(), f"--out '{out}' is a file, not a folder")]
    progrpo.refuse(problems)
    if args.command == "make":
        make(out, args.steps)
        return
    pipe = progrpo.load_pipeline(str(out / "pipeline"), torch.float32)
    if args.command == "spread":
        spread = constraint_spread(pipe)
        print(f"constraints of a prompt (40 prompts, {spread['constraints']} constraints) met by none of its group "
              f"of 16: {spread['never']:.3f}, by all: {spread['always']:.3f}, by some: {spread['some']:.3f}")
        return
    train, held = split_specs()
    for name, specs in (("held out", held), ("trained", train)):
        table, rewards, checks = evaluate(pipe, specs, cfg, args.per_prompt, args.eval_steps)
        print(f"{name}: " + " | ".join(f"{k} {acc:.3f} (reward {mean:.3f}, {n} samples)"
                                       for k, (acc, mean, n) in table.items()))
        met = {}
        for c in checks:
            for constraint, ok in c.items():
                met.setdefault(constraint.rstrip(" 01"), []).append(ok)
        print("  constraints met: " + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in met.items()))
        print(f"  reward mean {rewards.mean():.3f} std {rewards.std():.3f}: {len(rewards.unique())} values, "
              f"{(rewards == 1).float().mean():.3f} at 1, {(rewards == 0).float().mean():.3f} at 0")


if __name__ == "__main__":
    try:
        main()
    except progrpo.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
