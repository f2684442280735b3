"""Tests for repro/premise.py: the kept-set measure's known answers, the schedule rule, the clustering, run.sh's
flags, the command end to end on the tiny random pipeline, and bad input. CPU, offline, seconds each."""

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import progrpo
from progrpo import RunError
from repro import eval as ev
from repro import preflight, premise
from repro.flops import FLOPS_PRESETS
from repro.tiny import colour_reward

ROOT = Path(__file__).resolve().parent.parent
TIED = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 2.0])  # finals with a clamp: five tied at the floor


def tied_finals(n, size, generator):
    """(n, size) rewards, a third of them at a clamp value, the rest normal: the digits reward's shape."""
    r = torch.randn(n, size, generator=generator, dtype=torch.float64)
    return torch.where(torch.rand(n, size, generator=generator) < 1 / 3, torch.full_like(r, -2.5), r)


def test_chance_is_the_mean_over_every_subset():
    """random_subset_variance is exactly the mean variance over all k-subsets, ties included (no sampling)."""
    for k in (2, 4, 7):
        subsets = [premise.subset_variance(TIED, list(s)) for s in itertools.combinations(range(len(TIED)), k)]
        assert premise.random_subset_variance(TIED, k) == pytest.approx(sum(subsets) / len(subsets), rel=1e-12)


def test_kept_ratio_known_answers():
    """All-equal finals: no ratio (nan); a proxy that orders as the finals do (affinely), ties and all: exactly 1;
    which of several tied members is kept does not matter (kept-set overlap would say 2/4 here)."""
    assert all(map(torch.isnan, torch.tensor(premise.kept_ratio(torch.arange(8.0), torch.ones(8), 4))))
    for proxy in (TIED, 3 * TIED + 1):
        ratio, chance = premise.kept_ratio(proxy, TIED, 4)
        assert ratio == 1.0 and 0 < chance < 1
    best = progrpo.ovf_select(TIED, 4).tolist()  # [0, 1, 2, 7]: three of the five tied zeros, by index
    assert best == [0, 1, 2, 7] and premise.kept_set_ratio(TIED, [2, 3, 4, 7]) == (1.0, 4 / 7)


def test_uninformed_proxies_score_chance_on_tied_finals():
    """A random proxy, and a constant one (ovf_select then keeps by index), average the chance level on finals of
    which a third sit tied at a clamp."""
    g = torch.Generator().manual_seed(0)
    finals = tied_finals(3000, 16, g)
    for proxy in (torch.randn(3000, 16, generator=g), torch.zeros(3000, 16)):
        pairs = torch.tensor([premise.kept_ratio(p, f, 8) for p, f in zip(proxy, finals)])
        pairs = pairs[~pairs.isnan().any(1)]
        assert pairs[:, 0].mean().item() == pytest.approx(pairs[:, 1].mean().item(), abs=0.015)  # ~4 s.e.


def test_rank_corr_and_schedule_kept():
    """rank_corr: nan for a constant reference, 0 for a constant predictor; a schedule whose proxies are the finals
    keeps the best subset (1), whatever the number of checkpoints."""
    assert torch.isnan(torch.tensor(premise.rank_corr(torch.arange(4.0), torch.ones(4))))
    assert premise.rank_corr(torch.ones(4), torch.arange(4.0)) == 0.0
    assert premise.rank_corr(torch.arange(4.0), torch.arange(4.0)) == pytest.approx(1.0)
    final = tied_finals(1, 16, torch.Generator().manual_seed(1))[0]
    assert premise.schedule_kept({3: final, 5: final}, final, [(3, 8), (5, 4)])[0] == pytest.approx(1.0)


def row(step, gain, fidelity=1.0, ceiling=1.0):
    return dict(step=step, gain=gain, fidelity=fidelity, ceiling=ceiling)


def test_suggest_schedule_takes_the_earliest_step_from_which_all_are_informed():
    """Informed from step 3 on: (3, K1), (4, K2); a fluke at step 1 does not count; only the last step: straight
    to the last K; none: []; a fidelity under half of sqrt(ceiling) is not informed."""
    keeps = [8, 4]
    assert premise.suggest_schedule([row(1, 0.9), row(2, 0.1), row(3, 0.6), row(4, 0.7), row(5, 1)], keeps) == [
        (3, 8), (4, 4)]
    assert premise.suggest_schedule([row(1, 0.1), row(2, 0.2), row(3, 0.9)], keeps) == [(3, 4)]
    assert premise.suggest_schedule([row(1, 0.1), row(2, 0.2)], keeps) == []
    assert not premise.informed(row(1, 0.9, fidelity=0.29, ceiling=0.36))  # 0.29 < 0.5 x 0.6
    assert premise.informed(row(1, 0.5, fidelity=0.30, ceiling=0.36))


def test_clustering_of_equal_and_gaussian_rewards():
    """Equal rewards: every group zero-std, every |A| = 0; the Gaussian reference matches 0.38 / 0.08 at G = 48;
    the blocks are floor(n / G) per prompt."""
    equal = premise.clustering(torch.zeros(2, 48))
    assert [c["groups"] for c in equal] == [12, 6, 2]
    assert all(c["zero_std_groups"] == c["abs_adv_lt_0_1"] == c["abs_adv_lt_0_5"] == 1.0 for c in equal)
    g48 = equal[-1]
    assert g48["gaussian_lt_0_5"] == pytest.approx(0.383, abs=0.01) and g48["gaussian_lt_0_1"] == pytest.approx(
        0.080, abs=0.005)
    assert premise.ties(torch.tensor([[1.0, 1.0, 2.0, 3.0]]))["tied_in_group"] == 0.5


def test_run_sh_presets_are_read_as_run_sh_gives_them():
    """Each preset's flags, read from run.sh, are those of flops/preflight (group, schedule, the rest of FLUX's) and
    eval (model, CFG), and sd14's per-GPU prompt count is evaluated for one GPU."""
    for name, (_, flags) in FLOPS_PRESETS.items():
        args = progrpo.parse_args(premise.run_sh_flags(name))
        assert (args.group_size, args.prune) == (flags["group_size"], flags["prune"]), name
        assert all(getattr(args, key) == value for key, value in flags.items()), name
        if name.startswith("flux"):  # eval has no FLUX preset: preflight's copy of run.sh's FLUX array
            assert args.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"
            assert {key: getattr(args, key) for key in preflight.RUN_SH_FLAGS["flux"]} == preflight.RUN_SH_FLAGS["flux"]
            continue
        family = "sd35" if name.startswith("sd35") else "sd14"
        for key in ("pretrained_model_name_or_path", "guidance_scale", "mixed_precision", "resolution"):
            assert getattr(args, key) == ev.PRESETS[family]["flags"][key], (name, key)
    assert progrpo.parse_args(premise.run_sh_flags("sd14")).prompts_per_epoch == 4
    demo = progrpo.parse_args(premise.run_sh_flags("demo"))
    assert demo == ev.demo_args() and (demo.num_steps, demo.group_size, demo.prune) == (10, 16, "5:8,7:4")


def test_command_on_the_tiny_pipeline(tiny_dir, tmp_path):
    """The command writes premise.md / .png / .json (strict JSON); the measured group is training's epoch-0 group;
    every kept-set ratio is at most 1 (OVF on the finals is the best); the suggestion parses as a --prune."""
    report = premise.main([str(tiny_dir / "flow"), "--reward", "repro.tiny.Colour", "--prompts",
                           str(tiny_dir / "train.txt"), "--num_steps", "3", "--group_size", "4", "--prune", "1:2",
                           "--resolution", "16", "--mixed_precision", "no", "--max_sequence_length", "16",
                           "--num_prompts", "2", "--output_dir", str(tmp_path)])
    assert (tmp_path / "premise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| step t | noise left | fidelity |" in (tmp_path / "premise.md").read_text()
    saved = json.loads((tmp_path / "premise.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert [r["step"] for r in saved["steps"]] == [1, 2] and saved["setting"]["pool"] == premise.CLUSTER_POOL
    finals = torch.tensor(saved["raw"]["finals"])
    assert finals.shape == (2, 48) and torch.tensor(saved["raw"]["continuations"]).shape == (2, 2, 1, 4)
    ratios = [r for s in report["steps"] for r in s["per_group"]["kept_ratio"] if r == r]
    assert ratios and max(ratios) <= 1 + 1e-9
    progrpo.parse_prune_schedule(saved["suggested"], 3, 4)
    # members 0..G-1 are the trajectories training's epoch 0 samples for these prompts
    pipe = progrpo.load_pipeline(str(tiny_dir / "flow"), torch.float32)
    args = progrpo.Args(resolution=16, num_steps=3, group_size=4, prune="none", mixed_precision="no",
                        max_sequence_length=16, reward="repro.tiny.Colour")
    prompt = saved["raw"]["prompts"][1]
    text = progrpo.encode_prompts(pipe, [prompt], 16)
    samples, _, _ = progrpo.rollout(pipe, text, [prompt], colour_reward, args, 0, [], prompt_ids=[1])
    assert torch.allclose(samples["rewards"], finals[1, :4], atol=1e-5)


def test_command_on_the_shapes_testbed_at_tiny_size(tmp_path):
    """`premise shapes` reads run.sh's shapes preset (the shipped model, its checker, training's prompts) and runs
    end to end at tiny size: one prompt, G = 4, two measured steps. Every reward is a share of the prompt's
    constraints (k / 4, k / 7 or k / 8), and the proxies' kept set is never better than the finals'."""
    report = premise.main(["shapes", "--num_prompts", "1", "--group_size", "4", "--prune", "5:2", "--steps", "3,5",
                           "--output_dir", str(tmp_path)])
    assert report["setting"]["model"] == "repro/shapes/pipeline" and report["setting"]["steps"] == [3, 5]
    assert report["setting"]["reward"] == "repro.shapes.ShapesReward" and (tmp_path / "premise.png").is_file()
    finals = torch.tensor(report["raw"]["finals"]).flatten()
    shares = torch.stack([finals * n for n in (4, 7, 8)])
    assert ((shares - shares.round()).abs().min(0).values < 1e-5).all() and finals.min() >= 0 and finals.max() <= 1
    ratios = [r for s in report["steps"] for r in s["per_group"]["kept_ratio"] if r == r]
    assert all(r <= 1 + 1e-9 for r in ratios)


@pytest.mark.parametrize("argv, message", [
    (["no/such/model"], "as a model it needs --reward"),
    (["demo", "--num_prompts", "0"], "--num_prompts must be at least 1"),
    (["demo", "--continuations", "1"], "--continuations must be at least 2"),
    (["demo", "--steps", "0,3"], "--steps [0, 3] must be strictly increasing"),
    (["demo", "--steps", "a"], "--steps 'a' is not a comma-separated list"),
    (["demo", "--group_size", "8"], "--prune survivors [8, 4] must strictly decrease from --group_size 8"),
    (["demo", "--num_steps", "x"], "argument --num_steps: invalid int value: 'x'"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_a_run_error_before_anything_loads(argv, message):
    """Each bad input is a RunError naming the flag, raised before any model or prompt file is read."""
    with pytest.raises(RunError) as e:
        premise.main(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_run_sh_premise_refuses_bad_input_in_one_line(tmp_path):
    """`bash run.sh premise TARGET` reaches repro.premise: a model without --reward is one line on stderr, exit 2."""
    for name in ("run.sh", "requirements.txt", "requirements.lock"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    python = tmp_path / ".venv" / "bin" / "python"  # run.sh's .venv, set up: this Python, no installs
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    stamp = hashlib.sha256((ROOT / "requirements.txt").read_bytes() + (ROOT / "requirements.lock").read_bytes())
    (tmp_path / ".venv" / ".installed").write_text(stamp.hexdigest()[:16] + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", str(tmp_path / "run.sh"), "premise", "no/such/model"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: 'no/such/model' is not a preset (demo, shapes, sd35, sd35-flash, sd35-baseline, sd14, sd14-baseline, "
        "sd14-multi, flux, flux-baseline, digits): as a model it needs --reward (a module.attr reward factory, e.g. "
        "repro.scorers.PickScore)"]
