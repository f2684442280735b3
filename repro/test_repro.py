"""Tests for the paper's analytics in repro/: FLOP accounting, the matched-compute harness, diagnostics.

CPU only, offline; each test says in its docstring the one property it pins.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import progrpo
import repro.tiny as tiny_models
from repro import compare, diagnostics, flops

ROOT = Path(__file__).resolve().parent.parent
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def tiny_args(**overrides):
    base = dict(pretrained_model_name_or_path="", resolution=16, num_steps=6, group_size=6, prune="2:4,4:3",
                prompts_per_epoch=2, sample_batch_size=5, decode_batch_size=4, train_batch_size=4, guidance_scale=4.5,
                max_sequence_length=16, reward="repro.tiny.Colour", updates_per_epoch=1, clip_range=1e-4, beta=0.01,
                rank=4, lora_alpha=8, mixed_precision="no")
    return progrpo.Args(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------------
# Compute accounting
# ---------------------------------------------------------------------------------------------------

def test_cpu_attention_is_counted():
    """The CPU attention kernel, which torch's counter does not know, counts 4 b h s^2 d like the GPU ones."""
    q = torch.randn(2, 3, 10, 8)
    assert flops.count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)[1] == 4 * 2 * 3 * 10 * 10 * 8


def test_sampling_and_update_flops_are_per_call_times_counts(tiny):
    """FLOPs counted over a whole rollout and update = the schedule's counts x per-call FLOPs: no hidden calls."""
    pipe, params, prompts, text = tiny
    args = tiny_args()
    colour = tiny_models.colour_reward
    per_call = flops.call_flops(pipe, colour, text, prompts[0], args)
    schedule = progrpo.parse_prune_schedule(args.prune, args.num_steps, args.group_size)
    (samples, stats, _), counted = flops.count_flops(progrpo.rollout, pipe, text, prompts, colour, args, 0, schedule)
    nfe = len(prompts) * sum(progrpo.live_counts(args.num_steps, args.group_size, schedule))  # 2 (3*6 + 2*4 + 3) = 58
    assert per_call["model"] > 0 and per_call["decode"] > 0 and per_call["reward"] == 0  # colour has no matmul
    assert counted - stats["decodes"] * per_call["decode"] == nfe * per_call["model"]
    epoch = flops.epoch_flops(per_call, args, schedule)
    assert counted == epoch["sampling"] + epoch["checkpoints"] + epoch["final"] and epoch["nfe"] * 2 == nfe == 58
    adv = progrpo.group_advantages(samples["rewards"], samples["prompt_idx"])
    optimizer = torch.optim.SGD(params, lr=0.0)  # the weights' values do not change FLOPs
    _, counted = flops.count_flops(progrpo.train_epoch, pipe, params, optimizer, NO_SCALER, samples, adv, text, args, 0)
    assert per_call["model"] < per_call["train"] < 3 * per_call["model"] and per_call["reference"] < per_call["model"]
    assert counted == epoch["update"] == 2 * 3 * 5 * (per_call["train"] + per_call["reference"])


def test_flops_table_builds_for_the_real_architectures():
    """SD3.5-M, SD-v1.4 and FLUX.1-dev on meta, offline: the paper's per-image costs, its NFE counts, its ordering and
    scale; FLUX's per-call FLOPs as its architecture gives them by hand."""
    real = flops.preset_flops(ROOT / "configs")
    TERA, paper = 1e12, flops.PAPER_TFLOPS
    nfe = {"sd35": 360, "sd35-flash": 200, "sd35-baseline": 240, "sd14": 1880, "sd14-baseline": 800,
           "flux": 4 * 48 + 24 + 12, "flux-baseline": 6 * 24}
    assert {n: r["nfe"] for n, r in real.items()} == nfe
    # FLUX.1-dev at 512 px: 1024 image + 128 text tokens, one call (distilled guidance). Per token the 19 double-stream
    # blocks apply 113.2M weights to each stream (attention q, k, v, out 4 x 3072^2; MLP 2 x 3072 x 12288), the 38
    # single-stream blocks 113.2M to all (q, k, v 3 x 3072^2; MLP in 3072 x 12288, out 15360 x 3072), 2 FLOPs each;
    # attention 4 x 1152^2 x 3072 per block; embedders and the output layer about 0.1: 15.9 TFLOPs
    by_hand = 2 * 113.2e6 * (19 * (1024 + 128) + 38 * 1152) + 57 * 4 * 1152**2 * 3072
    fx = real["flux"]["per_call"]
    assert abs(fx["model"] / by_hand - 1) < 0.03 and fx["reference"] < fx["model"] < fx["train"] < 3 * fx["model"]
    assert fx["decode"] == real["sd35"]["per_call"]["decode"]  # SD3.5-M's VAE architecture, 16 latent channels
    assert real["flux"]["image_tokens"] == 1024 and real["flux-baseline"]["total"] > real["flux"]["total"]
    pc = real["sd35"]["per_call"]
    # the SD3 VAE decoder at 512 px: 2.51 vs 2.49
    assert abs(pc["decode"] / TERA / flops.PAPER_DECODE_TFLOPS - 1) < 0.03
    assert abs(pc["reward_image"] / TERA / flops.PAPER_REWARD_TFLOPS - 1) < 0.03  # CLIP-H's image tower: 0.335 vs 0.34
    total = {n: r["total"] / TERA for n, r in real.items()}
    assert total["sd35-baseline"] > total["sd35"] > total["sd35-flash"]
    # what runs (LoRA backward ~1 forward) is 0.44-0.48 of Table 4; the 6N-rule update is within a factor 2
    assert all(0.4 < total[n] / paper[n] < 1 for n in paper)
    variants = flops.accounting_variants(real)
    full = next(v for label, v in variants.items() if label.startswith("update = 3 forwards"))
    assert all(0.5 < full[n] / TERA / paper[n] < 2 for n in paper)
    assert any(all(abs(v[n] / TERA / paper[n] - 1) < 0.1 for n in paper) for v in variants.values())
    table = flops.flops_table(real)
    assert all(f"| {n} |" in table for n in real) and "335,627" in table


# ---------------------------------------------------------------------------------------------------
# The matched-compute comparison
# ---------------------------------------------------------------------------------------------------

def comparison_args(tiny_dir, **overrides):
    base = dict(pretrained_model_name_or_path=str(tiny_dir / "flow"), prompts=str(tiny_dir / "train.txt"),
                eval_prompts=str(tiny_dir / "test.txt"), reward="repro.tiny.Colour", resolution=16,
                mixed_precision="no", max_sequence_length=16, num_epochs=1, prompts_per_epoch=2,
                sample_batch_size=32, decode_batch_size=32, train_batch_size=8, eval_steps=4, eval_every=1,
                checkpointing_steps=1000, learning_rate=5e-3, clip_range=1e-2, beta=0.0, num_eval_prompts=3,
                ema=False)  # run.sh compare's --no-ema
    return progrpo.Args(**{**base, **overrides})


def test_budget_sets_the_epochs(tiny_dir):
    """A method's FLOPs per epoch are counted once on the model: training the whole expanded group costs more per
    epoch than training 4 of it (static OVF, or a uniform 4: the same cost) or than pruning it inside the loop
    (Pro-GRPO)."""
    per_epoch = {name: compare.epoch_total_flops(dataclasses.replace(comparison_args(tiny_dir), **changes))
                 for name, changes in compare.COMPARE_METHODS.items() if name != "grpo"}
    assert per_epoch["grpo-expanded"] > per_epoch["static-ovf"] == per_epoch["uniform-subset"] > 0
    assert per_epoch["grpo-expanded"] > per_epoch["pro-grpo"] > 0


def test_comparison_refuses_bad_flags_before_any_model_loads(monkeypatch):
    """An infinite budget or grid value, or a flag a method cannot run with, is refused at parsing, no model loaded."""
    monkeypatch.setattr(progrpo, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    for argv, message in ((["--max_flops", "inf"], "--max_flops must be positive and finite"),
                          (["--grid_learning_rate", "1e-3,inf"], "--grid_learning_rate values must be positive and "
                                                                 "finite"),
                          (["--num_steps", "6"], r"--prune checkpoints \[5, 7\] must be")):
        with pytest.raises(progrpo.RunError, match=message):
            compare.parse(argv)


def test_comparison_harness_runs(tmp_path, tiny_dir, monkeypatch):
    """`run.sh compare` in miniature (the two methods of the Figure 2 question, 1 seed, one epoch each, a 2-cell
    grid): every method at every cell, a best cell per method, the equal-updates table and the plot; a finished
    run of the same flags is read back, not retrained."""
    methods = {name: compare.COMPARE_METHODS[name] for name in ("grpo-expanded", "static-ovf")}
    monkeypatch.setattr(compare, "COMPARE_METHODS", methods)  # 4 runs, not 8: the test's time budget
    grid = {"learning_rate": [5e-3, 1e-3], "clip_range": [1e-2]}
    compare.compare(comparison_args(tiny_dir, output_dir=str(tmp_path)), 1, 1.0, grid)
    report = (tmp_path / "comparison.md").read_text()
    cells = ("lr0.005-clip0.01", "lr0.001-clip0.01")
    assert all(f"| {name} | {cell}" in report for name in methods for cell in cells)
    assert report.count("**best**") == len(methods) and (tmp_path / "comparison.png").is_file()
    assert "| lr0.001-clip0.01 | 0 |" in report  # static-ovf vs grpo-expanded after one update each
    run = dataclasses.replace(comparison_args(tiny_dir), **methods["static-ovf"], learning_rate=1e-3,
                              output_dir=str(tmp_path / "static-ovf" / "lr0.001-clip0.01-seed0"))
    stamp = (Path(run.output_dir) / "metrics.jsonl").stat().st_mtime_ns
    assert len(compare.train(run)) == 1 and (Path(run.output_dir) / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert compare.finished_history(dataclasses.replace(run, learning_rate=5e-3)) is None  # other flags: rerun


def stat_fields(stat):
    """The fields of a /proc/PID/stat file after the command name (which may hold spaces), or None if it ended."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children_of(pid):
    """PIDs of the live (not zombie) processes whose parent is `pid`, from /proc."""
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
            if (fields := stat_fields(stat)) and fields[1] == str(pid) and fields[0] != "Z"]


def alive(pid):
    fields = stat_fields(Path("/proc") / str(pid) / "stat")
    return fields is not None and fields[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
def test_stopping_a_comparison_stops_its_workers(tiny_dir, tmp_path):
    """`kill` on `python -m repro.compare --jobs 2` stops the runs its worker processes were running, and it exits
    143: no worker goes on using the cores unseen, as they did before run_all stopped them."""
    flags = ["--pretrained_model_name_or_path", str(tiny_dir / "flow"), "--prompts", str(tiny_dir / "train.txt"),
             "--eval_prompts", str(tiny_dir / "test.txt"), "--reward", "repro.tiny.Colour", "--resolution", "16",
             "--mixed_precision", "no", "--max_sequence_length", "16", "--prompts_per_epoch", "2", "--no-ema",
             "--num_eval_prompts", "3", "--eval_every", "1000", "--output_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "repro.compare", "--jobs", "2", "--seeds", "1", "--max_flops",
                             "1e15", "--methods", "grpo,pro-grpo", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers, deadline = [], time.monotonic() + 180
    try:
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            workers = [pid for pid in children_of(proc.pid)
                       if b"--multiprocessing-fork" in (Path("/proc") / str(pid) / "cmdline").read_bytes()]
        assert len(workers) == 2, f"no two workers started: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
        time.sleep(2)  # into their runs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(alive(pid) for pid in workers)
    finally:
        for pid in [proc.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_diagnostics_on_the_base_model(tmp_path, tiny_dir):
    """compare.diagnose: proxy fidelity at both pruning checkpoints, clustering and the Figure 1 histogram."""
    text = compare.diagnose(comparison_args(tiny_dir), 1, tmp_path)
    assert "| step 5: 16 -> 8 |" in text and "| step 7: 8 -> 4 |" in text and "expanded_abs_adv_lt_0.5" in text
    assert (tmp_path / "advantage_histogram.png").is_file() and (tmp_path / "diagnostics_audit.jsonl").is_file()


def synthetic_history(rewards, seconds, eval_every=2):
    """metrics.jsonl lines: one per epoch, an evaluation every `eval_every` epochs and at the last."""
    last = len(rewards) - 1
    return [dict(epoch=e, **{"time/cumulative_s": t}, **({"eval/reward_mean": r} if e % eval_every == 0 or e == last
                                                          else {})) for e, (r, t) in enumerate(zip(rewards, seconds))]


def test_best_cell_matched_time_and_equal_updates_by_hand():
    """Best cell by mean final eval over seeds; matched wall-clock at the shortest run's seconds, linear between
    evaluations; the equal-updates table at the epochs both methods evaluated. Values worked out by hand."""
    fast = synthetic_history([0.0, 9.0, 1.0, 9.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0])  # evals at 0, 2, 4 (t = 1, 3, 5)
    slow = synthetic_history([0.0, 9.0, 2.0, 9.0, 2.0, 9.0, 6.0], [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0])
    results = {("grpo-expanded", "a"): [fast, fast], ("grpo-expanded", "b"): [fast, slow],
               ("static-ovf", "a"): [slow, slow], ("static-ovf", "b"): [fast, fast]}
    table, best, horizon = compare.summarise(results, {"grpo-expanded": 2.0, "static-ovf": 1.0})
    assert horizon == 5.0 and best == {"grpo-expanded": "b", "static-ovf": "a"}  # finals: a 3, b 4.5; a 6, b 3
    # slow at 5 s: between its evals at t = 2 (0.0) and t = 6 (2.0) -> 1.5; fast at 5 s is its last eval, 3.0
    assert table["static-ovf", "a"]["at_horizon"] == [1.5, 1.5]
    assert table["grpo-expanded", "b"]["at_horizon"] == [3.0, 1.5]
    assert table["grpo-expanded", "a"]["flops"] == 10.0 and table["static-ovf", "a"]["epochs"] == 7
    rows = compare.figure2_rows(results, ["a"])  # expanded evals at 0, 2, 4; static-ovf at 0, 2, 4, 6
    assert [r.split(" | ")[1] for r in rows] == ["0", "2", "4"] and rows[1].endswith("| +1.000 |")


def test_paired_differences_by_hand():
    """Pro-GRPO minus each method at their best cells, seed by seed: mean +- population std and the seeds where it
    is positive, at matched FLOPs and matched time; no table without pro-grpo."""
    table = {("pro-grpo", "a"): dict(final=[0.5, 0.7, 0.6], at_horizon=[0.4, 0.4, 0.4]),
             ("grpo", "b"): dict(final=[0.4, 0.7, 0.8], at_horizon=[0.4, 0.3, 0.2])}
    rows = compare.paired_rows(table, {"pro-grpo": "a", "grpo": "b"})
    # final gaps 0.1, 0.0, -0.2: mean -0.033, std 0.125; time gaps 0, 0.1, 0.2: mean 0.1, std 0.082
    assert rows[2] == "| grpo | -0.033 +- 0.125 | 1 of 3 | +0.100 +- 0.082 | 2 of 3 |"
    assert compare.paired_rows(table, {"grpo": "b"}) == []


def test_methods_flag_picks_arms_and_refuses_unknown_ones(monkeypatch):
    """--methods takes any of the comparison's arms and the ablations (validated before any model loads) and names
    an unknown one in one line."""
    monkeypatch.setattr(progrpo, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    *_, methods = compare.parse(["--methods", "pro-grpo,pro-grpo-early,pro-grpo-g32"])
    assert methods == {name: compare.METHODS[name] for name in ("pro-grpo", "pro-grpo-early", "pro-grpo-g32")}
    with pytest.raises(progrpo.RunError, match="--methods: unknown grpo-huge"):
        compare.parse(["--methods", "grpo,grpo-huge"])


# ---------------------------------------------------------------------------------------------------
# Diagnostics: proxy fidelity and reward clustering
# ---------------------------------------------------------------------------------------------------

def test_audit_replay_gives_every_pruned_members_final_reward(tiny):
    """audit_rollout fills in every pruned member's final reward, equal to the unpruned run's (one trajectory per
    call: the same computation, bit for bit), and proxy fidelity is measurable on it."""
    pipe, _, prompts, text = tiny
    args = tiny_args(sample_batch_size=1, decode_batch_size=1, reward_batch_size=1)
    audit, stats = diagnostics.audit_rollout(pipe, text, prompts, tiny_models.colour_reward, args, 2,
                                             [(2, 4), (4, 3)])
    full, _, _ = progrpo.rollout(pipe, text, prompts, tiny_models.colour_reward,
                                 dataclasses.replace(args, prune="none"), 2, [])
    assert stats["nfe"] == 58
    for p, a in enumerate(audit):
        finals = {**dict(zip(a["survivors"], a["final"])), **a["audited"]}
        assert sorted(finals) == list(range(6))
        assert [finals[m] for m in range(6)] == full["rewards"].view(2, 6)[p].tolist()
        fidelity = diagnostics.proxy_fidelity([a], 0)
        assert -1 <= fidelity["spearman"] <= 1 and fidelity["overlap"] is not None


def test_proxy_fidelity_by_hand():
    """Spearman, Kendall and kept-set overlap on a fixed case, against values computed by hand."""
    checkpoint = dict(step=2, members=[0, 1, 2, 3, 4], proxy=[0.1, 0.4, 0.2, 0.9, 0.5], kept=[0, 3])
    audit = [dict(checkpoints=[checkpoint], survivors=[0, 3], final=[1.0, 5.0], audited={1: 2.0, 2: 3.0, 4: 4.0})]
    # proxy ranks 0 2 1 4 3, final ranks 0 1 2 4 3: d^2 = 0+1+1+0+0 = 2, rho = 1 - 6*2/(5*24) = 0.9
    # 10 pairs, only (1, 2) discordant: tau = (9 - 1) / 10 = 0.8. Finals by member are 1, 2, 3, 5, 4: OVF keeps
    # the lowest and the highest (members 0 and 3), so the overlap with kept {0, 3} is 1
    f = diagnostics.proxy_fidelity(audit, 0)
    assert f["spearman"] == pytest.approx(0.9) and f["kendall"] == pytest.approx(0.8) and f["overlap"] == 1.0
    audit[0]["checkpoints"][0]["kept"] = [0, 1]
    assert diagnostics.proxy_fidelity(audit, 0)["overlap"] == 0.5
    assert diagnostics.kendall([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / (2 * 3) ** 0.5)  # tau-b with a tie


def test_small_advantage_fraction():
    """The clustering measure counts |A| < delta within each group."""
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0, 5.0]])  # A = -1.41 -0.71 0 0.71 1.41; 0
    assert diagnostics.small_advantage_fraction(rewards, 0.5) == pytest.approx(6 / 10)
    assert diagnostics.small_advantage_fraction(rewards, 0.75) == pytest.approx(8 / 10)
