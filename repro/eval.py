"""The paper's evaluation: the base model against trained weights, under one fixed protocol, as the paper's tables.

    python -m repro.eval sd35 --weights outputs/sd35      (bash run.sh eval sd35 --weights outputs/sd35)
    python -m repro.eval sd14 --weights outputs/sd14      (bash run.sh eval sd14 ...: fetches the HPSv2 benchmark)
    python -m repro.eval flux --weights outputs/flux      (FLUX.1-dev; the paper has no FLUX table)
    python -m repro.eval demo                             (CPU, minutes: the demo's base model and its LoRA)
    python -m repro.eval sd35 --weights a/checkpoint-100 --weights b --geneval evaluation_metadata.jsonl

Why a separate command: progrpo.py's own `eval/reward_mean` scores a few held-out prompts with the training
reward only. The paper's tables score many benchmark prompts with several reward models that were not trained on,
so over-optimising one reward shows up as a drop in the others.

The protocol, one row per model (the base first, then each --weights folder):
  1. Prompts: DrawBench's 200 prompts (Saharia et al. 2022, fetched on first use from the Imagen team's public
     sheet) for both settings, and for SD-v1.4 also the HPSv2 benchmark (3,200 prompts, run.sh's
     dataset/hpsv2/test.txt), never trained on. `--prompts FILE` evaluates one file instead.
  2. Sampler: progrpo.sample_deterministic, the deterministic sampler training evaluates with: the Euler ODE for
     flow models (SD3.5-M: 40 steps, CFG 4.5, 512 px, as Flow-GRPO evaluates), DDIM with eta = 0 for SD1.x
     (SD-v1.4: 50 steps, CFG 5.0, 512 px, DanceGRPO's settings), the Euler ODE with FLUX.1-dev's distilled
     guidance 3.5 in one call (28 steps, 512 px, as Flow-GRPO's pickscore_flux evaluates). The demo uses the
     demo's own flags from run.sh.
  3. Seeds: image j of prompt i starts from noise that depends only on (--seed, i, j): prompts go in fixed chunks
     of CHUNK, and chunk c's image j is sampled with seed trajectory_seed(seed, "eval", c, j), which
     sample_deterministic turns into one generator per row. The base and every trained model see the same noise,
     so a row's difference is the weights' doing, and batch sizes change nothing but float round-off.
  4. Metrics: the paper's Table 1 columns, PickScore, Aesthetic, ImageReward, HPSv2.1, and CLIP score, each a
     repro.scorers reward (the demo: its own reward and JPEG compressibility, both weight-free). Every image is
     scored; a table cell is the mean over prompts of the per-prompt mean, with its standard error over prompts.
  5. Beside our rows, the paper's own figures for the same setting (repro/paper_tables.json, with where each
     comes from); a figure we could not source is an empty cell.

Writes into --output_dir (default outputs/eval/PRESET): eval.md (the tables, the protocol under each), eval.json
(every image's scores and noise seed), grid_<benchmark>.png (the first GRID_PROMPTS prompts, one row per model,
captioned), and with --geneval METADATA the images in the folder layout GenEval's evaluator reads.
"""

import argparse
import csv
import dataclasses
import io
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import progrpo
import progrpo_outputs
from progrpo import RunError

ROOT = Path(__file__).resolve().parent.parent  # the repo root: run.sh, dataset/, outputs/
CHUNK = 32  # prompts per sampling call; part of the seed's definition (see the module docstring, point 3)
GRID_PROMPTS = 8  # prompts (image 0 of each) in the captioned grid
CELL = 192  # grid cell side in pixels
PAPER_TABLES = Path(__file__).resolve().parent / "paper_tables.json"

DRAWBENCH_URL = ("https://docs.google.com/spreadsheets/d/1y7nAbmR4FREi6npB1u-Bo3GFdwdOPYJc617rBOxIRHY/"
                 "gviz/tq?tqx=out:csv")  # the Imagen team's DrawBench sheet as CSV: Prompts, Category
DRAWBENCH = ROOT / "dataset" / "drawbench"
HPSV2_TEST = ROOT / "dataset" / "hpsv2" / "test.txt"

PAPER_METRICS = (("PickScore", "repro.scorers.PickScore"), ("Aesthetic", "repro.scorers.Aesthetic"),
                 ("ImageReward", "repro.scorers.ImageReward"), ("HPSv2.1", "repro.scorers.HPSv2"),
                 ("CLIP score", "repro.scorers.CLIPScore"))

# The sampling flags of run.sh's SD35, SD14 and FLUX presets that the evaluation uses (test_eval checks they agree).
PRESETS = {
    "sd35": dict(flags=dict(pretrained_model_name_or_path="stabilityai/stable-diffusion-3.5-medium", resolution=512,
                            eval_steps=40, guidance_scale=4.5, mixed_precision="fp16"),
                 benchmarks=("drawbench",), label="SD3.5-M, Euler ODE sampler"),
    "sd14": dict(flags=dict(pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4", resolution=512,
                            eval_steps=50, guidance_scale=5.0, mixed_precision="bf16"),
                 benchmarks=("drawbench", "hpsv2"), label="SD-v1.4, DDIM (eta 0) sampler"),
    "flux": dict(flags=dict(pretrained_model_name_or_path="black-forest-labs/FLUX.1-dev", resolution=512,
                            eval_steps=28, guidance_scale=3.5, max_sequence_length=128, mixed_precision="bf16"),
                 benchmarks=("drawbench",), label="FLUX.1-dev, Euler ODE sampler, distilled guidance"),
}


# ----------------------------------------------------------------------------------------------------
# Presets, prompts, metrics
# ----------------------------------------------------------------------------------------------------

def demo_args(run_sh=ROOT / "run.sh"):
    """progrpo.Args of run.sh's demo block, read from run.sh itself, so the evaluation follows the demo when its
    model, reward or resolution change. Expects the block's shape: `demo)` ... `progrpo.py FLAGS "$@"` ... `;;`."""
    block = re.search(r"^\s*demo\)[^\n]*$(.*?)^\s*;;", Path(run_sh).read_text(), re.S | re.M)
    command = block and re.search(r"progrpo\.py(.*?)\"\$@\"", block[1], re.S)
    if not command:
        raise RunError(f"cannot find the demo's `progrpo.py ... \"$@\"` command in {run_sh}")
    return progrpo.parse_args(shlex.split(command[1].replace("\\\n", " ")))


def preset_args(preset):
    """(progrpo.Args with the preset's sampling flags, benchmark names, a label for the sampler)."""
    if preset == "demo":
        args = demo_args()
        return args, ("demo",), f"the demo's model ({args.pretrained_model_name_or_path}), deterministic sampler"
    p = PRESETS[preset]
    return dataclasses.replace(progrpo.Args(), **p["flags"]), p["benchmarks"], p["label"]


def drawbench_prompts():
    """DrawBench's 200 prompts, fetched with curl on first use into dataset/drawbench/ (prompts.txt, one a line)."""
    txt, raw = DRAWBENCH / "prompts.txt", DRAWBENCH / "drawbench.csv"
    if txt.is_file():
        return progrpo.read_prompts(txt)
    how = f"mkdir -p {raw.parent} && curl -fsSL '{DRAWBENCH_URL}' -o {raw}"
    if not raw.is_file():
        raw.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["curl", "-fsSL", "--max-time", "120", DRAWBENCH_URL, "-o", str(raw)],
                              capture_output=True).returncode == 0
        if not done:
            raw.unlink(missing_ok=True)
            raise RunError(f"could not download DrawBench's prompts; get them by hand with: {how}")
    rows = list(csv.DictReader(io.StringIO(raw.read_text(encoding="utf-8"))))
    column = next((c for c in (rows[0] if rows else {}) if c and c.strip().lower() == "prompts"), None)
    prompts = [" ".join(r[column].split()) for r in rows if column and (r[column] or "").strip()]
    if len(prompts) != 200:
        raise RunError(f"{raw} holds {len(prompts)} prompts in a 'Prompts' column, not DrawBench's 200; "
                       f"delete it and get it again with: {how}")
    txt.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return prompts


def benchmark_prompts(name, args):
    """The prompts of one benchmark: 'drawbench', 'hpsv2' (the HPSv2 benchmark), 'demo' (the demo's held-out)."""
    if name == "drawbench":
        return drawbench_prompts()
    if name == "hpsv2":
        if not HPSV2_TEST.is_file():
            raise RunError(f"{HPSV2_TEST} not found: `bash run.sh eval sd14` builds it (run.sh fetch_hpsv2_prompts)")
        return progrpo.read_prompts(HPSV2_TEST)
    return progrpo.read_prompts(args.eval_prompts)


def load_metrics(specs, device, chosen):
    """[(label, reward_fn)]: every metric's model loaded once, before anything is sampled, so a missing model
    fails in seconds. A weighted sum such as the demo's reward scores as its sum (build_reward's column 0)."""
    metrics = []
    for label, spec in specs:
        try:
            fn = progrpo.build_reward(spec, device)
        except (RunError, OSError, ValueError, ImportError) as e:
            hint = "" if chosen else ("; list the metrics that load with --metrics "
                                      "(e.g. --metrics repro.scorers.JpegCompressibility)")
            raise RunError(f"metric '{label}' cannot load ({str(e).splitlines()[0]}){hint}") from None
        metrics.append((label, fn))
    return metrics


# ----------------------------------------------------------------------------------------------------
# Models: the base pipeline, then trained weights on it
# ----------------------------------------------------------------------------------------------------

def weight_kind(folder, key=None):
    """'lora' or 'full' for a folder progrpo.py wrote (output_dir or checkpoint-N), else a one-line error.
    key: the denoiser's folder name, 'transformer' (SD3) or 'unet' (SD1.x); None accepts either."""
    folder = Path(folder)
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return "lora"
    if any((folder / k / "config.json").is_file() for k in ([key] if key else ["transformer", "unet"])):
        return "full"
    if not folder.is_dir():
        raise RunError(f"--weights '{folder}' is not a folder")
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[-1]) if
                         d.name.split("-")[-1].isdigit() else -1)
    hint = f"; it has checkpoints: pass one, e.g. --weights {checkpoints[-1]}" if checkpoints else ""
    raise RunError(f"--weights '{folder}' holds no trained weights (pytorch_lora_weights.safetensors or "
                   f"{f'{key}/' if key else 'transformer/ or unet/'}){hint}")


def load_model(args, weights, device):
    """The base pipeline (weights None) or the base with a LoRA folder / a full fine-tune's denoiser loaded on it.

    progrpo_outputs.load_trained_weights loads it as --eval_only does: a LoRA through diffusers'
    `pipe.load_lora_weights`, as users load it, each of its layers checked to have landed, so a LoRA of another
    model cannot pass for the base model's numbers.
    """
    pipe = progrpo.load_pipeline(args.pretrained_model_name_or_path, progrpo.DTYPES[args.mixed_precision])
    if weights is not None:
        key = progrpo.denoiser_key(pipe)
        weight_kind(weights, key)  # a folder without weights is named, with its checkpoints
        try:
            progrpo_outputs.load_trained_weights(pipe, weights, key)
        except ValueError as e:  # a LoRA of another model, or a torn weights file
            raise RunError(str(e)) from None
    return pipe.to(device)


# ----------------------------------------------------------------------------------------------------
# Sampling and scoring
# ----------------------------------------------------------------------------------------------------

def evaluate_model(pipe, prompts, metrics, args, images_per_prompt, keep=()):
    """Scores (n_prompts, images_per_prompt, n_metrics), noise seeds (n_prompts, images_per_prompt), and the
    images of the prompt indices in `keep` ({(i, j): (3, H, W)}), so memory stays one chunk's worth."""
    scores = torch.zeros(len(prompts), images_per_prompt, len(metrics))
    seeds = np.zeros((len(prompts), images_per_prompt), dtype=np.int64)
    kept = {}
    for c, start in enumerate(range(0, len(prompts), CHUNK)):
        chunk = prompts[start:start + CHUNK]
        text = progrpo.encode_prompts(pipe, chunk, args.max_sequence_length)
        for j in range(images_per_prompt):
            seed = progrpo.trajectory_seed(args.seed, "eval", c, j)
            images = progrpo.sample_deterministic(pipe, text, args, args.eval_steps, seed)  # (n, 3, H, W)
            for m, (_, fn) in enumerate(metrics):
                scores[start:start + len(chunk), j, m] = fn(images, chunk)[:, 0]  # build_reward's sum
            for r in range(len(chunk)):
                seeds[start + r, j] = progrpo.trajectory_seed(seed, "eval", r, 0)  # sample_deterministic's seed
                if (start + r, j) in keep:
                    kept[start + r, j] = images[r].float().cpu()
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero()[0].tolist()
        raise RunError(f"metric '{metrics[bad[2]][0]}' is not finite for prompt '{prompts[bad[0]]}'")
    return scores, seeds, kept


def summarise(scores):
    """(n_prompts, k, n_metrics) -> per metric (mean, standard error) over prompts of the per-prompt means."""
    per_prompt = scores.double().mean(1)  # (n_prompts, n_metrics)
    n = len(per_prompt)
    se = per_prompt.std(0, correction=1) / math.sqrt(n) if n > 1 else torch.full((scores.shape[2],), float("nan"))
    return [(float(m), float(s)) for m, s in zip(per_prompt.mean(0), se)]


# ----------------------------------------------------------------------------------------------------
# Outputs: eval.md, eval.json, grids, GenEval folders
# ----------------------------------------------------------------------------------------------------

def paper_rows(preset, benchmark):
    """The paper's figures for this setting: [(row label, {metric label: value}, where)]."""
    table = json.loads(PAPER_TABLES.read_text())
    rows = []
    for r in table["rows"]:
        if r["preset"] == preset and r["benchmark"] in (benchmark, None):
            note = "" if r["benchmark"] else ", prompt set not restated"
            rows.append((f"{r['model']} (paper{note})", r["scores"], r["where"]))
    return rows


def markdown_table(labels, ours, paper):
    """A markdown table: our rows as 'mean ± se', the paper's rows as printed in the paper, empty where unknown."""
    lines = ["| model | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, summary in ours:
        cells = [f"{m:.4f} ± {s:.4f}" if math.isfinite(s) else f"{m:.4f}" for m, s in summary]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, values, _ in paper:
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:.3f}" if k in values else "" for k in labels) + " |")
    return "\n".join(lines)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(draw, text, font, width, max_lines=3):
    """Greedy word wrap to `width` pixels, at most `max_lines` lines (the last one cut with an ellipsis)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 3)] + "..."
    return lines


def captioned_grid(rows, prompts, path):
    """One row per model (label on the left), one column per prompt (wrapped caption on top): a PNG."""
    font = _font(14)
    left, top, pad = 170, 56, 4
    n_col = len(prompts)
    canvas = Image.new("RGB", (left + n_col * (CELL + pad), top + len(rows) * (CELL + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, prompt in enumerate(prompts):
        for k, line in enumerate(_wrap(draw, prompt, font, CELL)):
            draw.text((left + c * (CELL + pad), 2 + 17 * k), line, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y = top + r * (CELL + pad)
        for k, line in enumerate(_wrap(draw, label, font, left - 8, max_lines=5)):
            draw.text((4, y + 4 + 17 * k), line, fill="black", font=font)
        for c, img in enumerate(images):
            pic = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            resample = Image.NEAREST if pic.width < CELL else Image.BICUBIC  # tiny demo images stay crisp
            canvas.paste(pic.resize((CELL, CELL), resample), (left + c * (CELL + pad), y))
    canvas.save(path)


def write_geneval(pipe, entries, args, images_per_prompt, folder):
    """GenEval's layout: folder/<00000>/metadata.jsonl (the prompt's metadata line) and samples/<0000>.png,
    one folder per metadata line, the same seeds as the benchmarks (prompt index, image index)."""
    prompts = [e["prompt"] for e in entries]
    for c, start in enumerate(range(0, len(prompts), CHUNK)):
        chunk = prompts[start:start + CHUNK]
        text = progrpo.encode_prompts(pipe, chunk, args.max_sequence_length)
        for j in range(images_per_prompt):
            images = progrpo.sample_deterministic(pipe, text, args, args.eval_steps,
                                                  progrpo.trajectory_seed(args.seed, "eval", c, j))
            for r, img in enumerate(images):
                d = Path(folder) / f"{start + r:05d}"
                (d / "samples").mkdir(parents=True, exist_ok=True)
                (d / "metadata.jsonl").write_text(json.dumps(entries[start + r]) + "\n")
                pic = (img.float().cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(pic).save(d / "samples" / f"{j:04d}.png")


def read_geneval_metadata(path):
    """GenEval's evaluation_metadata.jsonl: one JSON object with a 'prompt' per line."""
    try:
        entries = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise RunError(f"--geneval '{path}' is not readable JSON lines ({type(e).__name__})") from None
    if not entries or not all(isinstance(e, dict) and isinstance(e.get("prompt"), str) for e in entries):
        raise RunError(f"--geneval '{path}' needs one JSON object with a 'prompt' per line "
                       "(GenEval's prompts/evaluation_metadata.jsonl)")
    return entries


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("preset", choices=[*PRESETS, "demo"], help="the setting whose protocol to run")
    parser.add_argument("--weights", action="append", default=None,
                        help="trained weights to evaluate beside the base model (repeatable): a LoRA folder, a full "
                             "fine-tune folder (transformer/ or unet/) or a checkpoint-N folder; demo: its output_dir")
    parser.add_argument("--prompts", default=None, help="evaluate on this prompt file (one a line) instead of the "
                                                        "preset's benchmarks")
    parser.add_argument("--num_prompts", type=int, default=0, help="only the first N prompts of each set (0 = all)")
    parser.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt, seeds fixed per "
                                                                         "(prompt, image)")
    parser.add_argument("--metrics", default=None, help="comma list of reward specs (built-in names or module.attr) "
                                                        "to score with instead of the preset's")
    parser.add_argument("--pretrained_model_name_or_path", default=None, help="the base model instead of the "
                                                                              "preset's (e.g. a local copy)")
    parser.add_argument("--geneval", default=None, help="GenEval's evaluation_metadata.jsonl: also write every "
                                                        "model's images in GenEval's folder layout")
    parser.add_argument("--seed", type=int, default=0, help="seeds every image's noise")
    parser.add_argument("--batch_size", type=int, default=16, help="images per model call and per VAE decode")
    parser.add_argument("--output_dir", default=None, help="default outputs/eval/PRESET")
    return parser.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    progrpo.refuse([(opts.images_per_prompt < 1,
                     f"--images_per_prompt must be at least 1 (got {opts.images_per_prompt})"),
                    (opts.num_prompts < 0, f"--num_prompts must be at least 0 (got {opts.num_prompts})"),
                    (opts.batch_size < 1, f"--batch_size must be at least 1 (got {opts.batch_size})")])
    args, benchmarks, sampler = preset_args(opts.preset)
    args = dataclasses.replace(args, seed=opts.seed, sample_batch_size=opts.batch_size,
                               decode_batch_size=opts.batch_size,
                               pretrained_model_name_or_path=opts.pretrained_model_name_or_path
                               or args.pretrained_model_name_or_path)
    out = Path(opts.output_dir or ROOT / "outputs" / "eval" / opts.preset)
    progrpo.validate(dataclasses.replace(args, output_dir=str(out)))  # the model, seed and --output_dir, first
    weights = opts.weights
    if weights is None and opts.preset == "demo":  # the demo's trained LoRA, trained first when absent
        weights = [args.output_dir]
        if not (Path(args.output_dir) / "pytorch_lora_weights.safetensors").is_file():
            print(f"no trained demo weights in {args.output_dir}: training them first (bash run.sh demo)")
            if subprocess.run(["bash", str(ROOT / "run.sh"), "demo"]).returncode:  # README's table: this LoRA
                raise RunError("the demo's training failed (its output above says why)")
    for w in weights or []:  # before anything loads or samples
        weight_kind(w)
    sets = {Path(opts.prompts).stem: progrpo.read_prompts(opts.prompts, "--prompts")} if opts.prompts else {
        b: benchmark_prompts(b, args) for b in benchmarks}
    sets = {b: p[:opts.num_prompts or None] for b, p in sets.items()}
    geneval = read_geneval_metadata(opts.geneval) if opts.geneval else None
    if opts.metrics:
        paper_label = {spec: label for label, spec in PAPER_METRICS}  # so the paper's rows line up
        specs = [(paper_label.get(s.strip(), s.strip()), s.strip()) for s in opts.metrics.split(",") if s.strip()]
    elif opts.preset == "demo":
        specs = [(f"demo reward ({args.reward})", args.reward),
                 ("JPEG compressibility", "repro.scorers.JpegCompressibility")]
    else:
        specs = list(PAPER_METRICS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    metrics = load_metrics(specs, device, chosen=bool(opts.metrics))
    labels = [label for label, _ in metrics]

    models = [("base", None)] + [(str(w), w) for w in weights or []]
    results = {b: [] for b in sets}  # benchmark -> [(model name, scores, seeds, kept images)]
    names = []
    for label, w in models:
        pipe = load_model(args, w, device)
        key = progrpo.denoiser_key(pipe)
        name = (f"base: {args.pretrained_model_name_or_path}" if w is None else
                f"{label} ({'LoRA' if weight_kind(w, key) == 'lora' else 'full fine-tune'})")
        names.append(name)
        for b, prompts in sets.items():
            keep = {(i, 0) for i in range(min(GRID_PROMPTS, len(prompts)))}
            scores, seeds, kept = evaluate_model(pipe, prompts, metrics, args, opts.images_per_prompt, keep)
            results[b].append((name, scores, seeds, kept))
            summary = ", ".join(f"{lab} {m:.4f}" for lab, (m, _) in zip(labels, summarise(scores)))
            print(f"{name} | {b} ({len(prompts)} prompts x {opts.images_per_prompt}): {summary}")
        if geneval is not None:
            slug = "base" if w is None else re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")
            write_geneval(pipe, geneval, args, opts.images_per_prompt, out / "geneval" / slug)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()

    precision = "fp32" if args.mixed_precision == "no" else f"{args.mixed_precision} autocast"
    guidance = "guidance" if opts.preset == "flux" else "CFG"  # FLUX.1-dev's is a model input, not two calls
    protocol = (f"Protocol: {sampler}, {args.eval_steps} steps, {guidance} {args.guidance_scale}, "
                f"{args.resolution} px, {precision}; {opts.images_per_prompt} image(s) per prompt, noise seeded by "
                f"(seed {opts.seed}, prompt, image); cells: mean ± standard error over prompts of the per-prompt "
                "mean.")
    sourced = (f"Rows marked (paper): the paper's own figures, from repro/{PAPER_TABLES.name}, not measured here; "
               "an empty cell is a figure we could not source.")
    md = [f"# Evaluation: {opts.preset}", ""]
    record = dict(preset=opts.preset, protocol=protocol, metrics=labels, models=names,
                  sampler=dict(model=args.pretrained_model_name_or_path, steps=args.eval_steps,
                               guidance_scale=args.guidance_scale, resolution=args.resolution,
                               mixed_precision=args.mixed_precision, seed=opts.seed, chunk=CHUNK,
                               images_per_prompt=opts.images_per_prompt), benchmarks={})
    for b, prompts in sets.items():
        paper = paper_rows(opts.preset, b) if not opts.prompts else []
        ours = [(name, summarise(scores)) for name, scores, _, _ in results[b]]
        md += [f"## {b} ({len(prompts)} prompts x {opts.images_per_prompt} image(s))", "",
               markdown_table(labels, ours, paper), "", protocol, ""]
        md += ([sourced, ""] + [f"- {name}: {where}" for name, _, where in paper] + [""]) if paper else []
        images = [dict(model=name, prompt_index=i, prompt=prompts[i], image=j, noise_seed=int(seeds[i, j]),
                       scores={lab: float(scores[i, j, m]) for m, lab in enumerate(labels)})
                  for name, scores, seeds, _ in results[b] for i in range(len(prompts))
                  for j in range(opts.images_per_prompt)]
        record["benchmarks"][b] = dict(prompts=len(prompts), summary={
            name: {lab: dict(mean=m, se=s if math.isfinite(s) else None) for lab, (m, s) in zip(labels, summary)}
            for name, summary in ours}, paper=[dict(model=n, scores=v, where=w) for n, v, w in paper], images=images)
        grid_prompts = prompts[:GRID_PROMPTS]
        captioned_grid([(name, [kept[i, 0] for i in range(len(grid_prompts))]) for name, _, _, kept in results[b]],
                       grid_prompts, out / f"grid_{b}.png")
    (out / "eval.md").write_text("\n".join(md))
    (out / "eval.json").write_text(json.dumps(record, indent=1))
    print(f"done: {out / 'eval.md'}, {out / 'eval.json'}, grids {out}/grid_*.png")
    if geneval is not None:
        print(f"GenEval images: {out / 'geneval'}/<model>/; score each with GenEval's evaluator (github "
              "djghosh13/geneval): python evaluation/evaluate_images.py FOLDER --outfile results.jsonl "
              "--model-path DETECTOR_FOLDER && python evaluation/summary_scores.py results.jsonl")
    return record


if __name__ == "__main__":
    try:
        main()
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
