"""What diffusers' training examples leave around a run for people, and reading it back, for progrpo.py:
config.json (flags, package versions, git commit), the captioned sample grid of every evaluation, live metrics
through --report_to tensorboard | wandb, reward_curve.png redrawn at every evaluation, a model card (README.md)
with a loading snippet, and --eval_only's loading of saved weights (also repro.eval's).

Optional, as progrpo_kernels/ is: progrpo.py without this file still trains, evaluates, checkpoints, resumes and saves
weights, and writes metrics.jsonl and prune_audit.jsonl, but no pictures; it then refuses --report_to and
--eval_only. Nothing here imports progrpo.py or changes what it trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def start_run(args, out_dir):
    """Rank 0 at the start of a run: writes config.json and opens the --report_to logger. Returns (log, finish):
    log(metrics, history, grid, adv) after every epoch (grid: the eval PNG, or None when the epoch did not
    evaluate), finish(history) once the weights are saved."""
    write_run_record(args, out_dir)
    writer = None
    if args.report_to == "wandb":
        import wandb

        wandb.init(project="progrpo", config=dataclasses.asdict(args), dir=str(out_dir), sync_tensorboard=True)
    if args.report_to in ("tensorboard", "wandb"):  # wandb mirrors the tensorboard events
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "logs"))

    def log(metrics, history, grid, adv):
        if grid is not None:
            plot_rewards(history, out_dir / "reward_curve.png")  # redrawn at every evaluation
        if writer is None:
            return
        for name, value in metrics.items():
            writer.add_scalar(name, value, metrics["epoch"])
        if grid is not None:
            image = np.asarray(Image.open(grid).convert("RGB"))
            writer.add_image("eval/grid", image, metrics["epoch"], dataformats="HWC")
        writer.add_histogram("policy/advantages", adv.cpu(), metrics["epoch"])  # the only device-to-host copy of adv
        writer.flush()

    def finish(history):
        plot_rewards(history, out_dir / "reward_curve.png")
        write_model_card(args, out_dir, history)
        if writer is not None:
            writer.close()
        if args.report_to == "wandb":
            wandb.finish()

    return log, finish


def write_run_record(args, out_dir):
    """config.json: every flag, the package versions and the git commit, so a result can be traced to them."""
    packages = ("torch", "diffusers", "transformers", "peft", "triton")
    record = dict(args=dataclasses.asdict(args), argv=sys.argv, git_commit=None,
                  versions={name: version(name) if find_spec(name) else None for name in packages})
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True)
        record["git_commit"] = git.stdout.strip() or None
    except OSError:  # no git on this machine
        pass
    (out_dir / "config.json").write_text(json.dumps(record, indent=1) + "\n")


def save_grid(images, path, ncol, captions=None):
    """(N, 3, H, W) in [0, 1] -> one PNG, small images enlarged (nearest) to ~128 px, each captioned below."""
    n, _, h, w = images.shape
    scale = max(1, 128 // h)
    cell_w, cell_h, text_h = w * scale + 4, h * scale + 4, 12 if captions else 0
    canvas = Image.new("RGB", (ncol * cell_w, math.ceil(n / ncol) * (cell_h + text_h)), "white")
    pixels = (images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for k, img in enumerate(pixels):
        left, top = k % ncol * cell_w + 2, k // ncol * (cell_h + text_h) + 2
        canvas.paste(Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST), (left, top))
        if captions:  # the default font is ~6 px a character
            ImageDraw.Draw(canvas).text((left, top + h * scale + 1), captions[k][:cell_w // 6], fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def load_trained_weights(pipe, folder, key):
    """What progrpo.save_weights wrote (an output or checkpoint folder) into `pipe`, whose fine-tuned component is
    `key` ('transformer' or 'unet'): the full denoiser, or a LoRA through diffusers' load_lora_weights, checked to
    land on every one of its layers (diffusers only warns). A LoRA of another model is a
    ValueError, and so is a torn or foreign weights file. The file names keep in step with progrpo.WEIGHT_FILES."""
    from safetensors import SafetensorError, safe_open

    model, lora = getattr(pipe, key), Path(folder) / "pytorch_lora_weights.safetensors"
    if not lora.is_file():
        try:
            trained = type(model).from_pretrained(Path(folder) / key, dtype=torch.float32)  # the fp32 master copy
        except (OSError, ValueError) as e:
            raise ValueError(f"{Path(folder) / key} does not load as a {type(model).__name__}: "
                             f"{str(e).splitlines()[0]}") from None
        setattr(pipe, key, trained.to(model.device).requires_grad_(False).eval())
        return
    try:
        with safe_open(lora, "pt") as f:
            expected = sum(".lora_A." in name for name in f.keys())
    except SafetensorError as e:
        raise ValueError(f"{lora} is not a safetensors file ({e})") from None
    pipe.load_lora_weights(str(folder))
    loaded = sum(".lora_A." in name for name, _ in getattr(pipe, key).named_parameters())
    if expected == 0 or loaded != expected:
        raise ValueError(f"{lora}: {loaded} of its {expected} LoRA layers fit this {key}; is it a LoRA of this model?")


def write_eval_only(weights, reward, n_prompts, out_dir):
    """--eval_only's record, eval_only.json (beside the grid eval_only.png), and its line on stdout."""
    result = {"weights": str(Path(weights)), "eval/reward_mean": reward}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval_only.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"eval reward {reward:.4f} over {n_prompts} held-out prompts; eval_only.png and eval_only.json in {out_dir}")
    return [result]


def plot_rewards(history, path):
    """reward_curve.png: the survivors' training reward and the evaluation reward against epoch."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    evals = [m for m in history if "eval/reward_mean" in m]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["epoch"] for m in history], [m["reward/mean"] for m in history], label="train (survivors)")
    ax.plot([m["epoch"] for m in evals], [m["eval/reward_mean"] for m in evals], "o-",
            label="eval (ODE, held-out prompts)")
    ax.set(xlabel="epoch", ylabel="reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_model_card(args, out_dir, history):
    """README.md in the output folder: base model, reward, settings, final eval reward, and how to load it."""
    evals = [m["eval/reward_mean"] for m in history if "eval/reward_mean" in m]
    key = "unet" if (out_dir / "unet").is_dir() else "transformer"  # a full fine-tune's folder
    load = (f'pipe.{key} = type(pipe.{key}).from_pretrained("{out_dir}", subfolder="{key}")' if args.full_finetune
            else f'pipe.load_lora_weights("{out_dir}")')
    settings = ("reward", "group_size", "prune", "ovf_after_sampling", "uniform_after_sampling", "global_std",
                "shared_noise", "num_steps", "prompts_per_epoch", "learning_rate", "clip_range", "beta",
                "mixed_precision", "full_finetune", "rank", "lora_alpha")
    card = ["---", "library_name: diffusers", f"base_model: {args.pretrained_model_name_or_path}",
            f"tags: [text-to-image, pro-grpo, grpo, {'full-finetune' if args.full_finetune else 'lora'}]", "---", "",
            f"# Pro-GRPO fine-tune of {args.pretrained_model_name_or_path}", "",
            f"{len(history)} epochs. Final eval reward (ODE, {args.eval_steps} steps, {args.num_eval_prompts} held-out "
            f"prompts): {f'{evals[-1]:.4f}' if evals else 'not evaluated'}.", ""]
    card += [f"- {name}: `{getattr(args, name)}`" for name in settings] + ["", "```python"]
    card += ["from diffusers import DiffusionPipeline", "",
             f'pipe = DiffusionPipeline.from_pretrained("{args.pretrained_model_name_or_path}")', load, "```", ""]
    (out_dir / "README.md").write_text("\n".join(card))
