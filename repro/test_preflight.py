"""repro/preflight.py at its tiny CPU size: every figure printed and finite, the lr-0 checks sane, the projection's
arithmetic the schedule's own, and a bad preset name refused in one line.

The presets run here with smaller groups (SMALL_GROUPS) so the file stays under a minute on 2 shared cores;
everything else (T, micro-batches, LoRA, beta, learning rates, the code path) is the preset's. `bash run.sh
preflight` runs the real group sizes at the same tiny model size in about a minute.
"""

import math
import re

import pytest
import torch

from progrpo import RunError
from repro.flops import FLOPS_PRESETS
from repro.preflight import main, parse_args

LABELS = ("first-step |ratio - 1|", "clipfrac at lr 0", "grad norm", "reward group std", "peak memory sampling",
          "peak memory update", "seconds per guided evaluation", "seconds per decoded and scored image",
          "seconds per trained step", "projected epoch")
NUMBER = r"([-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf))"
SMALL_GROUPS = {"sd35": ("flow", dict(group_size=8, prune="5:4,7:2")),  # the same checkpoints as 48 -> 24 -> 12
                "sd35-baseline": ("flow", dict(group_size=4, prune="none"))}


@pytest.fixture(scope="module")
def two_presets():
    """One run of `preflight sd35 sd35-baseline` on this CPU, its stdout, results and failed checks."""
    import contextlib
    import io

    out, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread on 2 shared cores costs more than it gives
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
            for name, preset in SMALL_GROUPS.items():
                mp.setitem(FLOPS_PRESETS, name, preset)
            results, problems = main(parse_args(["sd35", "sd35-baseline", "--world_size", "1"]))
    finally:
        torch.set_num_threads(threads)
    return out.getvalue(), results, problems


def test_every_figure_is_printed_and_finite(two_presets):
    """Each preset's block prints every figure as `label: number`, and no number is NaN or inf."""
    text, _, _ = two_presets
    assert "CPU figures" in text
    blocks = text.split("== ")[1:]
    assert [b.split(":")[0] for b in blocks] == ["sd35", "sd35-baseline"]
    for block in blocks:
        for label in LABELS:
            found = re.search(re.escape(label) + r": " + NUMBER, block)
            assert found, f"'{label}' missing in:\n{block}"
            assert math.isfinite(float(found[1])), f"'{label}' is {found[1]}"
    ratio = re.search(r"projected epoch time sd35-baseline / sd35: " + NUMBER + "x", text)
    assert ratio and math.isfinite(float(ratio[1])) and float(ratio[1]) > 0
    assert "preflight: all checks passed" in text


def test_lr0_checks_are_sane(two_presets):
    """fp32 on CPU: the first update step reproduces the sampling log-probs to round-off, nothing clips at lr 0,
    and the first optimiser step has a finite non-zero gradient that moved the weights."""
    _, results, problems = two_presets
    assert problems == []
    for r in results:
        assert r["ratio_dev"] < 1e-4 and r["ratio_dev_lr"] < 1e-4  # both first updates start from the sampled weights
        assert r["clipfrac_lr0"] == 0
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["skipped"] == 0 and r["moved"] > 0
        assert 0 < r["peak_sample"] and 0 < r["peak_update"]


def test_projection_is_the_schedules_arithmetic(two_presets):
    """The projected epoch is 48 prompts x (NFE x s_eval + decoded images x s_image + trained steps x s_step), with
    the counts written out by hand: 8 -> 4 -> 2 at {5, 7} of 10 takes 6 x 8 + 2 x 4 + 2 x 2 = 60 NFE, decodes
    8 + 4 + 2 images and trains 2 x 9 steps; G = 4 unpruned takes 40 NFE, 4 images, 4 x 9 steps."""
    _, results, _ = two_presets
    counts = {"sd35": (60, 8 + 4 + 2, 2 * 9), "sd35-baseline": (40, 4, 4 * 9)}
    for r in results:
        nfe, images, steps = counts[r["name"]]
        assert (r["nfe"], r["kept"] * 9) == (nfe, steps)
        expected = 48 * (nfe * r["s_eval"] + images * r["s_image"] + steps * r["s_step"])
        assert r["projected"]["total"] == pytest.approx(expected, rel=1e-9)


def test_bad_input_is_refused(tmp_path):
    """Bad presets, world sizes, config folders and config files are one-line RunErrors before any model is built."""
    with pytest.raises(RunError, match="unknown preset 'sd99'"):
        main(parse_args(["sd99"]))
    with pytest.raises(RunError, match="do not split over --world_size 5"):
        main(parse_args(["sd35", "--world_size", "5"]))
    with pytest.raises(RunError, match="architecture config .*sd35m_vae.json' not found"):
        main(parse_args(["sd35", "--configs", str(tmp_path)]))
    with pytest.raises(RunError, match="--prompts must be at least 1"):
        parse_args(["--prompts", "0"])
    (tmp_path / "sd35m_vae.json").write_text("{not json")
    with pytest.raises(RunError, match="architecture config .*sd35m_vae.json' is not a JSON config"):
        main(parse_args(["sd35", "--configs", str(tmp_path)]))
    with pytest.raises(RunError, match="--configs '.*sd35m_vae.json' is not a folder"):
        parse_args(["sd35", "--configs", str(tmp_path / "sd35m_vae.json")])


def test_fp16_loss_scaler_path_runs():
    """--mixed_precision fp16 takes progrpo's GradScaler path (scale, unscale, maybe skip) and still trains: a finite
    non-zero gradient, weights that move, and no clipping at lr 0."""
    import contextlib
    import io

    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
            mp.setitem(FLOPS_PRESETS, "sd35", SMALL_GROUPS["sd35"])
            (r,), problems = main(parse_args(["sd35", "--mixed_precision", "fp16", "--world_size", "1"]))
    finally:
        torch.set_num_threads(threads)
    assert r["args"].mixed_precision == "fp16" and problems == []
    assert r["skipped"] < r["n_steps"] and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 and r["moved"] > 0


def test_flux_preset_runs_through_the_same_checks():
    """preflight flux builds FLUX.1-dev's architecture from configs/ (shrunk: the real classes, 16 latent channels
    packed into 64, dynamic shifting) with stand-in T5 / CLIP-L conditioning and no negative row, and passes every
    check: the first update step reproduces the sampling log-probs, nothing clips at lr 0, the weights move."""
    import contextlib
    import io

    threads = torch.get_num_threads()
    small = ("flux", dict(FLOPS_PRESETS["flux"][1], group_size=6, prune="3:4,4:2"))  # flux's checkpoints, fewer members
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
            mp.setitem(FLOPS_PRESETS, "flux", small)
            (r,), problems = main(parse_args(["flux", "--world_size", "1"]))
    finally:
        torch.set_num_threads(threads)
    assert problems == [] and r["kind"] == "flux" and "preflight: all checks passed" in out.getvalue()
    assert (r["nfe"], r["kept"], r["args"].num_steps) == (4 * 6 + 4 + 2, 2, 6)  # 6 x 4 steps, 4 x 1, 2 x 1
    assert r["ratio_dev"] < 1e-4 and r["clipfrac_lr0"] == 0 and r["moved"] > 0 and r["grad_norm"] > 0
    assert r["args"].guidance_scale == 3.5 and r["args"].rank == 64 and r["args"].mixed_precision == "no"  # CPU: fp32
