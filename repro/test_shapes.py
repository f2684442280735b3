"""Tests of the shapes testbed (repro/shapes.py): the prompt grammar, the held-out split, the checker on drawings
it must pass and fail, the reward contract, the shipped pipeline and its accuracy on held-out compositions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import progrpo
from repro import shapes

GUIDANCE = 4.5  # progrpo's default --guidance_scale


def upsample(pixels):
    """Canvas pixels (N, 3, CANVAS, CANVAS) -> the (N, 3, RESOLUTION, RESOLUTION) image the decoder would give."""
    return F.interpolate(pixels, scale_factor=shapes.RESOLUTION // shapes.CANVAS, mode="nearest")


def every_spec():
    return [s for k in shapes.CATEGORIES for s in shapes.all_specs()[k]]


@pytest.fixture(scope="module")
def pipe():
    return progrpo.load_pipeline(str(shapes.PIPELINE_DIR), torch.float32)


def test_prompts_parse_back_and_out_of_grammar_prompts_are_refused():
    """parse_prompt inverts caption on all 696 prompts; a number, plural, word or joint off the grammar is refused."""
    specs = every_spec()
    assert len(specs) == 12 + 24 + 132 + 528
    assert all(shapes.parse_prompt(shapes.caption(s)) == s for s in specs)
    assert shapes.parse_prompt("  Two  RED circles ") == (((2, "red", "circle"),), None)
    for bad in ("two red circle", "a red circles", "a purple circle", "four red circles", "a red circle next to a "
                "blue square", "two red circles and a blue square", "a red circle left of two blue squares", ""):
        with pytest.raises(progrpo.RunError, match="cannot read"):
            shapes.parse_prompt(bad)


def test_held_out_compositions_are_never_trained_and_words_all_are():
    """The split is seeded; no training prompt shares a held-out key (so no phrasing of a held-out layout is
    trained); every colour, shape, number and relation still occurs in training; the shipped files are the split."""
    train, held = shapes.split_specs()
    assert shapes.split_specs() == (train, held)
    assert [len(held[k]) for k in shapes.CATEGORIES] == [0, 6, 26, 104]
    for k in shapes.CATEGORIES:
        assert not {shapes.held_out_key(s) for s in held[k]} & {shapes.held_out_key(s) for s in train[k]}
        assert sorted(train[k] + held[k]) == sorted(shapes.all_specs()[k])
    words = lambda specs: {w for s in specs for w in shapes.caption(s).split()}  # noqa: E731
    assert words(s for k in shapes.CATEGORIES for s in train[k]) == words(every_spec())
    trained_lines = set((shapes.HERE / "train.txt").read_text().splitlines())
    assert trained_lines == {shapes.caption(s) for k in shapes.CATEGORIES for s in train[k]}
    pool = (shapes.HERE / "pool.txt").read_text().splitlines()  # compare shapes-pool: 2 of each compositional category
    assert set(pool) <= trained_lines and len(set(pool)) == shapes.POOL
    assert sorted(shapes.category(shapes.parse_prompt(p)) for p in pool) == sorted(["count", "pair", "position"] * 2)
    assert (shapes.HERE / "pool_eval.txt").read_text().splitlines() == [p for p in pool for _ in range(16)]
    held_lines = set((shapes.HERE / "eval.txt").read_text().splitlines())
    assert held_lines == {shapes.caption(s) for k in shapes.CATEGORIES for s in held[k]}  # held out only, all 136


def test_checker_passes_every_drawing_of_every_prompt():
    """Each of the 696 prompts drawn 3 times satisfies all its constraints: the reward (N,) fp32 CPU is 1 for all."""
    specs = every_spec() * 3
    prompts = [shapes.caption(s) for s in specs]
    rewards = shapes.ShapesReward("cpu")(upsample(shapes.render_batch(specs, seed=1)), prompts)
    assert rewards.shape == (len(specs),) and rewards.dtype == torch.float32 and rewards.device.type == "cpu"
    assert rewards.tolist() == [1.0] * len(specs)


def test_checker_fails_known_wrong_drawings():
    """A drawing of a different prompt fails exactly the constraints that differ: colour, shape, count, order."""
    cases = [  # (prompt, what is drawn instead, the constraints that must fail)
        ("a red circle", "a blue circle", {"colour 0", "count 0"}),
        ("a red circle", "a red square", {"what 0", "colour 0", "count 0"}),
        ("a red circle", "two red circles", {"count 0", "nothing else"}),
        ("three green triangles", "two green triangles", {"count 0", "nothing else"}),
        ("a red circle and a blue square", "a red circle", {"what 1", "colour 1", "count 1", "nothing else"}),
        ("a red circle and a blue square", "a red circle and a yellow square", {"colour 1", "count 1"}),
        ("a red circle left of a blue square", "a red circle right of a blue square", {"where"}),
        ("a yellow triangle above a green circle", "a yellow triangle below a green circle", {"where"}),
    ]
    for seed in range(5):
        drawn = upsample(shapes.render_batch([shapes.parse_prompt(d) for _, d, _ in cases], seed))
        satisfied, checks = shapes.score(drawn, [p for p, _, _ in cases])
        for (prompt, _, failing), c, s in zip(cases, checks, satisfied.tolist()):
            assert {k for k, ok in c.items() if not ok} == failing, (prompt, seed)
            assert s == pytest.approx(1 - len(failing) / len(c), abs=1e-6)
    empty = shapes.score(torch.zeros(2, 3, 32, 32), ["a red circle", "a red circle left of a blue square"])[0]
    assert empty.tolist() == [0.0, 0.0]  # nothing drawn satisfies nothing, not even 'nothing else'
    blobs = torch.zeros(3, 3, shapes.CANVAS, shapes.CANVAS)
    red = torch.tensor(shapes.COLOURS["red"])[:, None]
    blobs[0, :, 8, 4:11], blobs[0, :, 5:12, 7] = red, red  # a plus
    blobs[1, :, 3:10, 5], blobs[1, :, 9, 5:12] = red, red  # an L
    blobs[2, :, 4:12, 4:6] = red[..., None]  # a bar 8 x 2
    assert [[o[:2] for o in found] for found in shapes.find_objects(blobs)] == [[("red", None)]] * 3
    assert shapes.score(upsample(blobs), ["a red circle"] * 3)[0].tolist() == [0.25] * 3  # only 'nothing else'


def test_components_match_scipy_labelling():
    """components() partitions pixels as scipy.ndimage.label does per colour (4-connected), on random maps."""
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(0)
    colour_map = torch.randint(0, 3, (20, 16, 16), generator=g)
    foreground = torch.rand(20, 16, 16, generator=g) < 0.6
    labels = shapes.components(colour_map, foreground)
    for n in range(20):
        for k in range(3):
            ref, count = ndimage.label((foreground[n] & (colour_map[n] == k)).numpy())
            ours = labels[n].numpy()
            pairs = {(r, o) for r, o in zip(ref.flatten(), ours.flatten()) if r}
            assert len(pairs) == count == len({o for _, o in pairs})  # one of ours per scipy component, and back


def test_cleanliness_is_one_on_drawings_and_falls_off_palette():
    """The optional smooth term: 1 (up to round-off) on drawings with their anti-aliased edges, below exp(-1) with
    off-palette noise of mean residual ~0.05 that leaves every constraint satisfied."""
    spec = shapes.parse_prompt("a red circle left of a blue square")
    clean = upsample(shapes.render_batch([spec] * 4, 0))
    murky = (clean + 0.1 * torch.rand(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    cleanliness = shapes.Cleanliness("cpu")
    assert (cleanliness(clean, [""] * 4) - 1).abs().max().item() < 1e-6
    assert cleanliness(murky, [""] * 4).max().item() < 0.5
    assert shapes.ShapesReward("cpu")(murky, [shapes.caption(spec)] * 4).tolist() == [1.0] * 4


def test_shipped_pipeline_loads_and_decodes_canvas_pixels(pipe):
    """progrpo.load_pipeline takes the folder; decode(latents of a drawing) is the drawing, 2 x 2 per pixel."""
    from diffusers import AutoencoderTiny, StableDiffusion3Pipeline

    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.vae, AutoencoderTiny)
    assert pipe.vae_scale_factor * shapes.CANVAS == shapes.RESOLUTION
    pixels = shapes.render_batch(every_spec()[:8], 0)
    cfg = pipe.vae.config
    decoded = progrpo.decode(pipe, (shapes.encode_pixels(pixels) - cfg.shift_factor) * cfg.scaling_factor)
    # fp32 round-off of a scale, shift, atanh / tanh pair and two convs on values of size 1: ~1e-7
    assert (decoded - upsample(pixels)).abs().max().item() < 2e-6


def test_base_model_draws_held_out_compositions(pipe):
    """The pretrained model before any RL, on held-out count, pair and position prompts it never saw (4 of each,
    one ODE sample, 10 steps): most constraints met, some images fully right. Measured: mean 0.66, 3 of 12 right;
    the model 300 steps into pretraining scores ~0.15 on held-out prompts."""
    _, held = shapes.split_specs()
    _, rewards, _ = shapes.evaluate(pipe, {k: held[k][:4] for k in shapes.CATEGORIES}, GUIDANCE)
    assert len(rewards) == 12 and rewards.mean().item() >= 0.45 and (rewards == 1).sum().item() >= 2


def test_constraint_spread_counts_every_constraint_of_every_group(pipe):
    """Two of training's epoch-0 groups of 4: one entry per constraint of each prompt, the three shares sum to 1,
    and a share is a count over those entries."""
    spread = shapes.constraint_spread(pipe, num_prompts=2, group_size=4)
    train = progrpo.read_prompts(str(shapes.HERE / "train.txt"))
    g = torch.Generator().manual_seed(progrpo.trajectory_seed(0, 0, "prompts", 0))
    prompts = [train[i] for i in torch.randperm(len(train), generator=g)[:2].tolist()]
    assert spread["constraints"] == sum(len(shapes.constraints(shapes.parse_prompt(p), [])) for p in prompts)
    assert spread["never"] + spread["always"] + spread["some"] == pytest.approx(1)
    assert all(round(spread[k] * spread["constraints"], 6).is_integer() for k in ("never", "always"))


def test_make_is_deterministic(tmp_path):
    """Two runs of the make script (a few steps) write identical weight and prompt files."""
    for run in ("a", "b"):
        shapes.make(tmp_path / run, steps=2, log=lambda message: None)
    files = sorted(p for p in (tmp_path / "a").rglob("*") if p.suffix in (".safetensors", ".txt"))
    assert len(files) == 9  # three text encoders, the transformer, the decoder; train, eval, pool, pool_eval.txt
    for path in files:
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes(), path


def test_drawings_keep_objects_apart_and_relations_clear():
    """render's layouts: objects inside the canvas, GAP apart; a relation's objects in order, more along than across."""
    rng = np.random.default_rng(0)
    for relation in shapes.RELATIONS:
        for _ in range(50):
            a, b = shapes.place([6.0, 6.0], relation, rng)
            axis, sign = shapes.RELATIONS[relation]
            along, across = sign * (a[axis] - b[axis]), abs(a[1 - axis] - b[1 - axis])
            assert along >= 6.0 + shapes.GAP and along > across
    for _ in range(50):
        centres = shapes.place([6.0] * 3, None, rng)
        assert all(3.5 <= c <= shapes.CANVAS - 3.5 for centre in centres for c in centre)


def test_bad_flags_are_refused(tmp_path):
    """No samples per prompt, a NaN guidance scale, an --out that is a file: one-line RunErrors before anything runs."""
    (tmp_path / "file").write_text("not a folder\n")
    for argv, message in ((["eval", "--per_prompt", "0"], "--per_prompt must be at least 1"),
                          (["eval", "--guidance_scale", "nan"], "--guidance_scale must be finite"),
                          (["make", "--out", str(tmp_path / "file")], "--out '.*file' is a file, not a folder")):
        with pytest.raises(progrpo.RunError, match=message):
            shapes.main(argv)
