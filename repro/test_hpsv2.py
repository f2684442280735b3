"""The sd14 presets' HPSv2 side: run.sh's prompt files, and scorers.HPSv2's score against HPSv2's own code.

The prompt tests run run.sh's real `fetch_hpsv2_prompts` with `curl` replaced by a stub that serves small
local samples (this machine cannot reach the sources) and with the open_clip install step stubbed out.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DANCEGRPO = "https://raw.githubusercontent.com/XueZeyue/DanceGRPO/main/assets/prompts.txt"

BENCHMARK = {  # four styles, in the JSON-list-of-strings layout of HPDv2's benchmark/<style>.json
    "anime": ["an anime girl", "a  robot\ncat"],
    "concept-art": ["a castle", "a dragon"],
    "paintings": ["a river", "a portrait"],
    "photo": ["A dog on a beach", "a city at night"],
}
TRAIN = "a red car\n\na dog on a  beach\nan old tree\n"  # DanceGRPO's layout; its second prompt is a benchmark one


def fetch(tmp_path, serve, fail=()):
    """Run run.sh's fetch_hpsv2_prompts in tmp_path; `serve` maps a file name to the text curl returns for it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    samples = tmp_path / "samples"
    samples.mkdir(exist_ok=True)
    for name, text in serve.items():
        (samples / name).write_text(text, encoding="utf-8")
    curl = bin_dir / "curl"  # curl -fsSL --max-time N URL -o FILE: copy samples/<basename of URL> to FILE
    curl.write_text(f'#!/bin/sh\nfor a; do case "$a" in http*) url="$a";; esac; prev="$a"; done\nout="$prev"\n'
                    f'case " {" ".join(fail)} " in *" ${{url##*/}} "*) exit 22;; esac\n'
                    f'cp "{samples}/${{url##*/}}" "$out"\n')
    python = bin_dir / "python"  # open_clip counts as installed, so the install step (tested by hand) is skipped
    python.write_text(f'#!/bin/sh\n[ "$*" = "-c import open_clip" ] && exit 0\nexec "{sys.executable}" "$@"\n')
    for f in (curl, python):
        f.chmod(0o755)
    script = f"source <(sed -n '/^fetch_hpsv2_prompts() {{/,/^}}/p' '{ROOT / 'run.sh'}'); PY='{python}'; " \
             "set -euo pipefail; fetch_hpsv2_prompts"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def sources():
    return {"prompts.txt": TRAIN, **{f"{style}.json": json.dumps(p) for style, p in BENCHMARK.items()}}


def test_fetch_writes_training_prompts_and_interleaved_benchmark(tmp_path):
    """train.txt = the training prompts less benchmark ones (case/space-blind); test.txt = styles interleaved."""
    result = fetch(tmp_path, sources())
    assert result.returncode == 0, result.stderr
    d = tmp_path / "dataset" / "hpsv2"
    assert (d / "train.txt").read_text().splitlines() == ["a red car", "an old tree"]
    assert (d / "test.txt").read_text().splitlines() == [
        "an anime girl", "a castle", "a river", "A dog on a beach",
        "a robot cat", "a dragon", "a portrait", "a city at night"]
    assert "2 training prompts (1 benchmark prompts left out), 8 benchmark prompts" in result.stdout


def test_fetch_refuses_train_and_eval_files_that_share_a_prompt(tmp_path):
    """Files sharing a prompt (an older run.sh trained on the benchmark) are refused: one line, exit 2."""
    d = tmp_path / "dataset" / "hpsv2"
    d.mkdir(parents=True)
    (d / "train.txt").write_text("a castle\na red car\nA  River\n")
    (d / "test.txt").write_text("a river\na castle\n")
    result = fetch(tmp_path, sources())
    assert result.returncode == 2
    assert re.fullmatch(r"error: dataset/hpsv2/train.txt and test.txt share 2 prompts \(first: 'a river'\); .*\n",
                        result.stderr), result.stderr


def test_fetch_failure_prints_the_command_that_gets_the_file(tmp_path):
    """A failed download leaves no partial file and prints the exact curl command, exit 2."""
    result = fetch(tmp_path, sources(), fail=("prompts.txt",))
    assert result.returncode == 2
    assert result.stderr == (f"error: could not download prompts.txt; get it with: "
                             f"curl -fsSL {DANCEGRPO} -o dataset/hpsv2/raw/prompts.txt\n")
    assert not (tmp_path / "dataset" / "hpsv2" / "raw" / "prompts.txt").exists()


def test_fetch_refuses_a_benchmark_file_that_is_not_a_list_of_prompts(tmp_path):
    """A benchmark file in another layout (a dict, say) is refused with one line, not a traceback."""
    result = fetch(tmp_path, {**sources(), "photo.json": json.dumps({"prompts": ["a dog"]})})
    assert result.returncode == 2
    assert result.stderr.startswith("error: dataset/hpsv2/raw/photo.json is not a JSON list of prompts")
    assert result.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------------
# scorers.HPSv2 against HPSv2's own scoring code (vectors from repro/reference/make_hpsv2_vectors.py)
# ----------------------------------------------------------------------------------------------------

REFERENCE = ROOT / "repro" / "reference"
TOL = 2e-5  # cosines in [-1, 1]; a float32 scorer lands within 3.3e-7 of the float64 reference (measured there)


class _Missing(type):
    """A torchvision name open_clip binds at import time; calling it fails, so a test cannot lean on it."""

    def __getattr__(cls, name):  # InterpolationMode.BICUBIC in a default argument
        return f"{cls.__name__}.{name}"


def _stub(name):
    def fail(*args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {name} was called; scorers.HPSv2 must preprocess tensors itself")
    return _Missing(name, (), {"__init__": fail})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _stub(name)
        setattr(self, name, value)
        return value


def import_open_clip(monkeypatch):
    """The real open_clip, over the real torchvision where it loads, else over stand-ins for the torchvision
    names open_clip's transform and utils modules bind at import time (scorers.HPSv2 calls none of them)."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed: pip install --no-deps open_clip_torch ftfy wcwidth (no torchvision)")
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a build that does not load beside this torch ("torchvision::nms does not exist")
        from transformers.utils import is_torchvision_available

        is_torchvision_available()  # cached now, while transformers (open_clip imports it) sees no stand-ins
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                     "torchvision.ops", "torchvision.ops.misc"):
            monkeypatch.setitem(sys.modules, name, _StubModule(name))
    import open_clip

    return open_clip


@pytest.fixture(scope="module")
def vectors():
    return torch.load(REFERENCE / "hpsv2_vectors.pt", weights_only=True)


def tiny_hpsv2(monkeypatch, tmp_path, vectors):
    """scorers.HPSv2 loading the tiny model from a checkpoint in HPSv2's layout ({'state_dict': ...})."""
    from repro import scorers

    open_clip = import_open_clip(monkeypatch)
    open_clip.add_model_config(REFERENCE / "hpsv2_tiny.json")
    state = dict(vectors["state_dict"])
    cfg = vectors["config"]["text_cfg"]
    state["token_embedding.weight"] = torch.zeros(cfg["vocab_size"], cfg["width"])
    state["token_embedding.weight"][vectors["token_ids"]] = vectors["token_rows"]
    torch.save({"state_dict": state}, tmp_path / "hps_tiny.pt")
    return scorers.HPSv2("cpu", checkpoint=tmp_path / "hps_tiny.pt", arch="hpsv2_tiny")


def test_hpsv2_scores_match_hpsv2s_own_scoring_code(monkeypatch, tmp_path, vectors):
    """Every (image, prompt) pair scores as hpsv2's img_score.py does, within float32 round-off."""
    scorer = tiny_hpsv2(monkeypatch, tmp_path, vectors)
    assert torch.equal(scorer.tokenizer(vectors["prompts"]), vectors["tokens"])  # open_clip's BPE, 77, truncation
    images = vectors["images"].permute(0, 3, 1, 2).float() / 255  # (3, 3, 240, 240) in [0, 1], the reward's input
    n = len(vectors["prompts"])
    pairs = scorer(images.repeat_interleave(n, 0), vectors["prompts"] * len(images))  # (9,) image-major
    assert pairs.dtype == torch.float32 and pairs.shape == (len(images) * n,)
    err = (pairs.double() - vectors["scores"].flatten()).abs().max().item()
    assert err <= TOL, f"HPSv2 score off by {err:.2e} (tolerance {TOL:.0e})"
    top, bottom = vectors["wide_rows"]  # 180 x 240: HPSv2 pads to a square rather than cropping
    wide = scorer(images[:, :, top:bottom].repeat_interleave(n, 0), vectors["prompts"] * len(images))
    err = (wide.double() - vectors["scores_wide"].flatten()).abs().max().item()
    assert err <= TOL, f"HPSv2 score of a non-square image off by {err:.2e} (tolerance {TOL:.0e})"


def test_hpsv2_checkpoint_holding_an_object_is_refused_without_running_it(monkeypatch, tmp_path):
    """The HPSv2 checkpoint loads as data only: one holding a pickled object is refused with one line naming it, and
    the object's code never runs (loading the same file as code does run it: the test can fail)."""
    from progrpo import RunError
    from repro import scorers

    class RunsCode:  # unpickling it makes a folder
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)

    open_clip = import_open_clip(monkeypatch)
    open_clip.add_model_config(REFERENCE / "hpsv2_tiny.json")
    torch.save({"state_dict": {}, "extra": RunsCode()}, tmp_path / "hps.pt")
    with pytest.raises(RunError, match="HPSv2 checkpoint '.*hps.pt' holds objects") as error:
        scorers.HPSv2("cpu", checkpoint=tmp_path / "hps.pt", arch="hpsv2_tiny")
    assert "\n" not in str(error.value) and not (tmp_path / "ran").exists()
    torch.load(tmp_path / "hps.pt", weights_only=False)
    assert (tmp_path / "ran").is_dir()
