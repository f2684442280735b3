"""Reference vectors for repro/test_hpsv2.py: HPSv2's own scoring code on a tiny random-weight open_clip ViT.

The project's environment cannot import torchvision (none on the index loads beside torch 2.13's CPU build), so
this runs once in a throwaway venv where it does:

    python3 -m venv /tmp/hpsv2-ref
    /tmp/hpsv2-ref/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 ftfy clint requests
    /tmp/hpsv2-ref/bin/pip install --no-deps hpsv2==1.2.0   # its pins (pytest==7.2.0, protobuf<4) are not needed
    cd /tmp/hpsv2-ref/lib/python3.11/site-packages   # hpsv2 1.2.0's wheel lacks its BPE vocabulary: open_clip's
    cp open_clip/bpe_simple_vocab_16e6.txt.gz hpsv2/src/open_clip/   # is the same file (git blob 7b5088a5)
    cd - && /tmp/hpsv2-ref/bin/python repro/reference/make_hpsv2_vectors.py

What it scores, the way hpsv2/img_score.py does: `create_model_and_transforms(..., light_augmentation=True,
output_dict=True)` from hpsv2's own copy of open_clip, its `preprocess_val` on PIL images (to tensor, bicubic
resize of the longest side to 224, pad, OpenAI mean/std), its tokenizer, and diag(image_features @
text_features.T) from `model(image, text)`. The architecture is ViT-H-14's layout at a tiny width and depth
(hpsv2_tiny.json), every parameter drawn from a seeded generator so LayerNorm and bias mistakes show. The
scores are computed in float64 (the reference) and float32 (to show the round-off a float32 scorer should
reach), and the upstream open_clip model, given the same weights, is checked to give the same scores.

Writes hpsv2_tiny.json and hpsv2_vectors.pt (under 1 MB: the 49408-row token embedding is stored only at the
rows the prompts use; the other rows cannot change a score).
"""
import json
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from hpsv2.src.open_clip import add_model_config, create_model_and_transforms, get_tokenizer
from PIL import Image

HERE = Path(__file__).resolve().parent
CONFIG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
PROMPTS = ["A cat with two horns on its head",
           "an astronaut riding a horse, digital art, trending on ArtStation, 8k!!",
           "a very long prompt about a café by the sea " * 8]  # > 77 tokens: truncated, last token end-of-text
SIZE = 240  # square like the presets' images; 240 -> 224 exercises the antialiased bicubic resize
WIDE = slice(30, 210)  # rows of a 180 x 240 crop: HPSv2 resizes its longest side and pads the rest with zeros


def images():
    """(3, SIZE, SIZE, 3) uint8: two smooth colour fields and one with hard edges (bicubic overshoots there)."""
    g = torch.Generator().manual_seed(1)
    smooth = [F.interpolate(0.1 + 0.8 * torch.rand(1, 3, k, k, generator=g), size=(SIZE, SIZE), mode="bilinear",
                            align_corners=False)[0] for k in (4, 12)]
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    edges = torch.stack([((yy // 20 + xx // 20) % 2).float(), (xx > SIZE // 3).float(), (yy < SIZE // 2).float()])
    return (torch.stack(smooth + [edges]) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def random_state(model):
    """Every parameter drawn from N(0, 1/fan_in), LayerNorm weights around 1: nothing left at its init value."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.named_parameters():
        if name == "logit_scale":
            state[name] = p.detach().clone()  # unused by the score
        elif p.dim() >= 2:
            state[name] = torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5
        elif "ln" in name and name.endswith("weight"):
            state[name] = 1 + 0.2 * torch.randn(p.shape, generator=g)
        else:
            state[name] = 0.2 * torch.randn(p.shape, generator=g)
    return state


def hpsv2_scores(model, preprocess, tokenizer, pil_images, dtype):
    """(images, prompts) scores, img_score.py's way: features from model(image, text), then their dot products."""
    model = model.to(dtype)
    with torch.no_grad():
        pixels = torch.stack([preprocess(im) for im in pil_images]).to(dtype)
        out = model(pixels, tokenizer(PROMPTS))
        return out["image_features"] @ out["text_features"].T


def main():
    path = HERE / "hpsv2_tiny.json"
    path.write_text(json.dumps(CONFIG, indent=2) + "\n")
    add_model_config(path)
    model, _, preprocess = create_model_and_transforms("hpsv2_tiny", None, precision="fp32", device="cpu",
                                                       light_augmentation=True, output_dict=True)
    state = random_state(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("attn_mask" in k for k in missing), (missing, unexpected)
    model.eval()
    tokenizer = get_tokenizer("hpsv2_tiny")
    pixels_u8 = images()
    pil_images = [Image.fromarray(im.numpy()) for im in pixels_u8]
    ref64 = hpsv2_scores(model, preprocess, tokenizer, pil_images, torch.float64)
    ref32 = hpsv2_scores(model, preprocess, tokenizer, pil_images, torch.float32)
    wide = hpsv2_scores(model, preprocess, tokenizer, [Image.fromarray(im[WIDE].numpy()) for im in pixels_u8],
                        torch.float64)

    open_clip.add_model_config(path)  # upstream open_clip's model code, same weights, same preprocessed pixels
    upstream = open_clip.create_model("hpsv2_tiny", pretrained=None).eval()
    missing, unexpected = upstream.load_state_dict(state, strict=False)
    assert not unexpected and all("attn_mask" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        pixels = torch.stack([preprocess(im) for im in pil_images])
        img = F.normalize(upstream.encode_image(pixels), dim=-1)
        txt = F.normalize(upstream.encode_text(open_clip.get_tokenizer("hpsv2_tiny")(PROMPTS)), dim=-1)
    up32 = img @ txt.T
    tokens = tokenizer(PROMPTS)
    assert torch.equal(tokens, open_clip.get_tokenizer("hpsv2_tiny")(PROMPTS))
    print("float64 reference scores:\n", ref64.numpy())
    print(f"max |float32 - float64|: hpsv2 {(ref32.double() - ref64).abs().max():.2e}, "
          f"upstream open_clip {(up32.double() - ref64).abs().max():.2e}")

    used = torch.unique(tokens)
    weights = {k: v for k, v in state.items() if k != "token_embedding.weight"}
    torch.save({"config": CONFIG, "state_dict": weights, "token_ids": used,
                "token_rows": state["token_embedding.weight"][used], "images": pixels_u8, "prompts": PROMPTS,
                "tokens": tokens, "scores": ref64, "scores_float32": ref32, "wide_rows": (WIDE.start, WIDE.stop),
                "scores_wide": wide, "versions": {
                    "hpsv2": "1.2.0", "open_clip_torch": open_clip.__version__, "torch": str(torch.__version__),
                    "numpy": np.__version__}}, HERE / "hpsv2_vectors.pt")
    print(f"wrote {HERE / 'hpsv2_vectors.pt'} ({(HERE / 'hpsv2_vectors.pt').stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
