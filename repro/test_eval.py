"""repro/eval.py: the table's columns and rows, that trained weights are really loaded, the seed contract, the
GenEval layout, DrawBench's parsing and that the eval presets agree with run.sh. CPU, tiny models, offline."""

import json
import re
from pathlib import Path

import pytest
import torch

import progrpo
from progrpo import RunError
from repro import eval as ev
from repro.tiny import colour_reward

METRICS = "repro.tiny.Colour,repro.scorers.JpegCompressibility"


def _trained(tiny_dir, folder, full_finetune, kind="flow"):
    """Weights as progrpo.py saves them, moved far from the base: a LoRA with non-zero B, or perturbed weights."""
    pipe = progrpo.load_pipeline(str(tiny_dir / kind), torch.float32, full_finetune)
    args = progrpo.Args(rank=4, lora_alpha=4, full_finetune=full_finetune)
    torch.manual_seed(1)
    params = progrpo.trainable_parameters(pipe, args)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))  # gaussian LoRA init has B = 0, a no-op: make it act
    progrpo.save_weights(pipe, folder, full_finetune)
    return folder


def test_table_rows_weights_seeds_and_geneval(tiny_dir, tmp_path):
    """eval.md has the metric columns and one row per model; a LoRA and a full fine-tune checkpoint each change
    the scores (their weights were loaded); the base row's first image is sample_deterministic's with the
    documented seed; eval.json holds every image; GenEval folders hold metadata.jsonl and samples/NNNN.png."""
    lora = _trained(tiny_dir, tmp_path / "lora", False)
    full = _trained(tiny_dir, tmp_path / "full" / "checkpoint-2", True)
    meta = tmp_path / "geneval.jsonl"
    lines = [{"tag": "colors", "prompt": "a photo of a red dog"}, {"tag": "colors", "prompt": "a photo of a blue cup"}]
    meta.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "eval"
    record = ev.main(["demo", "--pretrained_model_name_or_path", str(tiny_dir / "flow"), "--weights", str(lora),
                      "--weights", str(full), "--prompts", str(tiny_dir / "test.txt"), "--num_prompts", "3",
                      "--images_per_prompt", "2", "--metrics", METRICS, "--geneval", str(meta),
                      "--output_dir", str(out)])

    md = (out / "eval.md").read_text().splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("| model |"))
    assert md[header] == "| model | repro.tiny.Colour | repro.scorers.JpegCompressibility |"
    rows = [line for line in md[header + 2:] if line.startswith("|")]
    assert len(rows) == 3 and rows[0].startswith("| base: ") and "(LoRA)" in rows[1] and "(full fine-tune)" in rows[2]
    assert all(re.fullmatch(r"\| .+ \| -?\d+\.\d{4} ± \d+\.\d{4} \| -?\d+\.\d{4} ± \d+\.\d{4} \|", r) for r in rows)
    assert any(line.startswith("Protocol: ") for line in md)

    bench = record["benchmarks"]["test"]
    summary = [bench["summary"][name]["repro.tiny.Colour"]["mean"] for name in record["models"]]
    assert abs(summary[1] - summary[0]) > 1e-3 and abs(summary[2] - summary[0]) > 1e-3  # fp32 noise is ~1e-7
    assert len(bench["images"]) == 3 * 3 * 2  # models x prompts x images
    assert json.loads((out / "eval.json").read_text())["benchmarks"]["test"]["images"] == bench["images"]

    # The base row's prompt 0, image 0: chunk 0, image 0 -> seed trajectory_seed(seed, "eval", 0, 0), row 0.
    args = ev.preset_args("demo")[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the device eval.main sampled on
    pipe = progrpo.load_pipeline(str(tiny_dir / "flow"), progrpo.DTYPES[args.mixed_precision]).to(device)
    prompts = progrpo.read_prompts(tiny_dir / "test.txt")[:3]
    text = progrpo.encode_prompts(pipe, prompts, args.max_sequence_length)
    images = progrpo.sample_deterministic(pipe, text, args, args.eval_steps, progrpo.trajectory_seed(0, "eval", 0, 0))
    first = next(x for x in bench["images"] if x["model"] == record["models"][0] and x["image"] == 0)
    assert first["prompt_index"] == 0
    assert abs(first["scores"]["repro.tiny.Colour"] - colour_reward(images, prompts)[0].item()) < 1e-5

    assert (out / "grid_test.png").is_file()
    for model in ("base", re.sub(r"[^A-Za-z0-9_.-]+", "-", str(lora)).strip("-")):
        for i, line in enumerate(lines):
            folder = out / "geneval" / model / f"{i:05d}"
            assert json.loads((folder / "metadata.jsonl").read_text()) == line
            assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]


def test_flux_preset_evaluates_a_flux_lora(tiny_dir, tmp_path, monkeypatch):
    """`eval flux` on the tiny FLUX.1-dev folder (the preset's flags but 32 px, 3 steps, fp32): the FLUX.1 family
    samples, its LoRA loads and changes the scores, and the protocol line names FLUX's distilled guidance."""
    flags = {**ev.PRESETS["flux"]["flags"], "resolution": 32, "eval_steps": 3, "max_sequence_length": 16,
             "mixed_precision": "no"}
    monkeypatch.setitem(ev.PRESETS["flux"], "flags", flags)
    lora = _trained(tiny_dir, tmp_path / "lora", False, kind="flux")
    record = ev.main(["flux", "--pretrained_model_name_or_path", str(tiny_dir / "flux"), "--weights", str(lora),
                      "--prompts", str(tiny_dir / "test.txt"), "--num_prompts", "2", "--metrics", METRICS,
                      "--output_dir", str(tmp_path / "eval")])
    summary = record["benchmarks"]["test"]["summary"]
    base, trained = (summary[name]["repro.tiny.Colour"]["mean"] for name in record["models"])
    assert abs(trained - base) > 1e-3 and record["sampler"]["guidance_scale"] == 3.5
    assert "3 steps, guidance 3.5, 32 px" in record["protocol"]


def test_wrong_weights_are_refused(tiny_dir, tmp_path):
    """A folder without weights names its newest checkpoint; an SD1 LoRA on the SD3 base fails, not passes as base."""
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-10").mkdir()
    with pytest.raises(RunError, match="checkpoint-10"):
        ev.weight_kind(tmp_path / "run", "transformer")
    unet_lora = _trained(tiny_dir, tmp_path / "unet_lora", False, kind="ddim")
    args = progrpo.Args(pretrained_model_name_or_path=str(tiny_dir / "flow"), mixed_precision="no")
    with pytest.raises(RunError, match="LoRA layers fit"):
        ev.load_model(args, unet_lora, torch.device("cpu"))


def test_bad_flags_are_refused_before_anything_loads(tiny_dir, tmp_path, monkeypatch):
    """A model that is no pipeline, a file as --output_dir, a folder as --prompts: one line each, before any load."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad flag was refused")

    monkeypatch.setattr(progrpo, "load_pipeline", loaded)
    monkeypatch.setattr(ev, "load_metrics", loaded)
    (tmp_path / "file").write_text("not a folder\n")
    model = ["--pretrained_model_name_or_path", str(tiny_dir / "flow")]
    for flags, message in ((["--pretrained_model_name_or_path", str(tmp_path)], "is neither a hub id"),
                           (model + ["--output_dir", str(tmp_path / "file")], "is a file, not a folder"),
                           (model + ["--prompts", str(tmp_path)], "is a folder")):
        with pytest.raises(RunError, match=f"^{flags[-2]} '.*' {message}") as error:
            ev.main(["sd35", *flags])
        assert "\n" not in str(error.value)


def test_standard_error_over_prompts():
    """Cells are the mean over prompts of per-prompt means, with the sample standard error over prompts."""
    scores = torch.tensor([[0.0, 2.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])[:, :, None]  # per-prompt 1, 2, 3, 4
    (mean, se), = ev.summarise(scores)
    assert abs(mean - 2.5) < 1e-12 and abs(se - (5 / 3) ** 0.5 / 2) < 1e-12


def test_drawbench_csv(tmp_path, monkeypatch):
    """The Imagen sheet's CSV (Prompts, Category) becomes prompts.txt; a file without 200 prompts is refused."""
    monkeypatch.setattr(ev, "DRAWBENCH", tmp_path)
    rows = [f'"A ""quoted"", prompt {i}",Colors' for i in range(200)]
    (tmp_path / "drawbench.csv").write_text("Prompts,Category\n" + "\n".join(rows) + "\n")
    prompts = ev.drawbench_prompts()
    assert len(prompts) == 200 and prompts[7] == 'A "quoted", prompt 7'
    assert (tmp_path / "prompts.txt").read_text().splitlines() == prompts
    (tmp_path / "prompts.txt").unlink()
    (tmp_path / "drawbench.csv").write_text("Prompts,Category\nonly one,Colors\n")
    with pytest.raises(RunError, match="1 prompts.*curl"):
        ev.drawbench_prompts()


def test_presets_follow_run_sh():
    """The eval presets' sampling flags are run.sh's SD35 / SD14 / FLUX flags; the demo preset parses run.sh's demo."""
    text = (Path(ev.ROOT) / "run.sh").read_text()
    names = {"sd35": "SD35", "sd14": "SD14", "flux": "FLUX"}
    assert set(ev.PRESETS) == set(names)
    for preset, array in names.items():
        flags = re.search(rf"^{array}=\((.*?)\)\s*$", text, re.S | re.M)[1]
        for name, value in ev.PRESETS[preset]["flags"].items():
            assert re.search(rf"--{name} {re.escape(str(value))}(\s|$)", flags), (preset, name, value)
    demo = ev.demo_args()
    assert demo.output_dir and progrpo.parse_reward_spec(demo.reward)


def test_paper_rows_line_up_with_columns():
    """The paper's Pro-GRPO figures land in their own columns, an unsourced cell stays empty, ours show mean ± se."""
    labels = [label for label, _ in ev.PAPER_METRICS]
    paper = ev.paper_rows("sd35", "drawbench")
    table = ev.markdown_table(labels, [("ours", [(24.0, 0.05)] * 5)], paper).splitlines()
    assert table[0] == "| model | PickScore | Aesthetic | ImageReward | HPSv2.1 | CLIP score |"
    assert "| Pro-GRPO (paper) | 24.008 | 6.046 | 1.397 | 0.322 |  |" in table
    assert "| Flow-GRPO (paper) | 23.322 |  |  |  |  |" in table
    assert table[2] == "| ours | " + " | ".join(["24.0000 ± 0.0500"] * 5) + " |"
    assert all(r["preset"] in ("sd35", "sd14") for r in json.loads(ev.PAPER_TABLES.read_text())["rows"])
