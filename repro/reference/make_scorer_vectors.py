"""Make the reference vectors that repro/test_scorers.py checks repro/scorers.py against.

It runs the reference packages' OWN model code on tiny random configurations of their real architectures:
  - LAION aesthetic predictor v2: `simple-aesthetics-predictor` 0.1.2, class AestheticsPredictorV2Linear
    (CLIPVisionModelWithProjection -> L2 normalise -> the published MLP head `layers`);
  - ImageReward: `image-reward` 1.5, class ImageReward.ImageReward (BLIP ViT + BERT with cross-attention -> MLP,
    then (r - mean) / std), called through its own tensor entry point `score_gard` and its PIL entry point `score`.
These packages pin transformers<5, timm 0.6.13 and need torchvision, so they cannot live in the project's env.
Run it in a throwaway venv (seen working on CPU, Python 3.11, 2026-12):

    python3 -m venv /tmp/scorers-ref
    /tmp/scorers-ref/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/scorers-ref/bin/pip install transformers==4.36.2 timm==0.6.13 safetensors
    /tmp/scorers-ref/bin/pip install --no-build-isolation fairscale==0.4.13
    /tmp/scorers-ref/bin/pip install --no-deps image-reward==1.5 simple-aesthetics-predictor==0.1.2
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 /tmp/scorers-ref/bin/python repro/reference/make_scorer_vectors.py

(`--no-deps`: image-reward's own requirements pull diffusers and datasets, which scoring never uses; its package
`__init__` imports OpenAI's `clip`, which PyPI does not carry, so we import its model modules directly.)

What it writes, next to this file (about 0.5 MB together):
  tiny_bert/vocab.txt            a 40-word WordPiece vocabulary: BLIP's tokenizer built on it (no download)
  scorers_tiny.safetensors       the tiny weights in the reference's own key names ("aesthetic/<key>",
                                 "imagereward/<key>"), stored as int8 codes q (the fp32 weight is exactly
                                 q * 2**exponent, exponents in the json), and the input images as uint8
  scorers_tiny.json              tiny configs, exponents, prompts, the reference's token ids, and the scores
  scorers_published_keys.json    name -> shape of every tensor in the published checkpoints' layout, from the
                                 reference classes built at the real configuration on the meta device

Why int8 codes: the heads' widths (768/16 -> 1024 -> 128 -> 64 -> 16 -> 1) are fixed by the published
architecture, so even a tiny model has ~150k weights per scorer. Drawing every weight on a power-of-two grid
with 8-bit codes keeps the file small while the fp32 values the reference ran with are reproduced bit for bit.
"""

import json
import math
import os
import sys
import types
from importlib.util import find_spec
from importlib.metadata import version

import torch
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))

# ImageReward's med_config.json (hub THUDM/ImageReward) is BLIP's configs/med_config.json: BERT-base with
# cross-attention; BLIP_Pretrain overwrites encoder_width with the ViT's width (1024 for ViT-L).
BLIP_MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}
# create_vit('large') in ImageReward/models/BLIP/blip.py, in VisionTransformer's argument names.
BLIP_VIT_LARGE = {"img_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
CLIP_L14_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}

TINY_SIZE = 32  # both tiny models see 32x32 crops; the inputs are 48x64, so resize and crop both act
TINY_VIT = {"img_size": TINY_SIZE, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}
TINY_CLIP_VISION = {"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "image_size": TINY_SIZE, "patch_size": 8, "projection_dim": 16, "hidden_act": "quick_gelu"}
TINY_WORDS = ("a an the of on in with and photo painting red blue green cat dog cats dogs tree trees house sky "
              "city night sunset portrait astronaut riding horse mountain lake river old man woman ##s ##ing").split()
PROMPTS = [
    "a photo of a red cat",
    "An old man riding a horse, painting of the city at night with unicornish sky",  # "unicornish" -> [UNK]
    " ".join(["a blue tree on the mountain"] * 7),  # 42 words: truncated at 35 tokens
]


def import_imagereward():
    """ImageReward's model modules without its package __init__ (which imports `clip`, diffusers, datasets)."""
    root = os.path.dirname(find_spec("ImageReward").origin)
    for name, path in (("ImageReward", root), ("ImageReward.models", os.path.join(root, "models"))):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    import ImageReward.ImageReward as ir_module
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    return ir_module, blip_pretrain, VisionTransformer


def tiny_tokenizer():
    """BLIP's init_tokenizer on the tiny vocabulary: BertTokenizer plus the [DEC] and [ENC] tokens it adds."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(os.path.join(HERE, "tiny_bert"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer


def randomise(state, generator):
    """Fresh random values for every float tensor, on a power-of-two grid with int8 codes.

    Mean kept from the reference's init (LayerNorm weights stay near 1, biases near 0), spread 1/sqrt(fan_in)
    for matrices and 0.2 for vectors, so every tensor is non-trivial and a swapped or skipped one shows.
    """
    codes, exponents = {}, {}
    for key in sorted(state):
        value = state[key]
        if not value.is_floating_point():
            codes[key] = value.clone()
            continue
        spread = 1 / math.sqrt(value[0].numel()) if value.dim() >= 2 else 0.2
        drawn = value.mean() + spread * torch.randn(value.shape, generator=generator)
        exponent = math.ceil(math.log2(drawn.abs().max().item() / 127))
        codes[key] = (drawn / 2.0 ** exponent).round().clamp(-127, 127).to(torch.int8)
        exponents[key] = exponent
    weights = {k: (c.float() * 2.0 ** exponents[k] if k in exponents else c) for k, c in codes.items()}
    return codes, exponents, weights


def tensor_transforms(compose):
    """The steps of a CLIP-style Compose that act on float tensors: Resize, CenterCrop, Normalize."""
    from torchvision.transforms import CenterCrop, Compose, Normalize, Resize

    return Compose([t for t in compose.transforms if isinstance(t, (Resize, CenterCrop, Normalize))])


def make_images(generator):
    """(3, 3, 48, 64) uint8: smooth random images (bilinear upsampled 6x8 noise) inside [16, 240].

    Smooth and away from 0 and 1, so bicubic overshoot never reaches the [0, 1] clamp that PIL's uint8 output
    applies and the float tensor path does not: both references then define the same function.
    """
    low = torch.rand(3, 3, 6, 8, generator=generator)
    smooth = torch.nn.functional.interpolate(low, size=(48, 64), mode="bilinear", align_corners=False)
    return (16 + smooth * 224).round().to(torch.uint8)


@torch.no_grad()
def aesthetic_reference(images, pil_images, ir_module, generator):
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPVisionConfig

    model = AestheticsPredictorV2Linear(CLIPVisionConfig(**TINY_CLIP_VISION)).eval()
    codes, exponents, weights = randomise(model.state_dict(), generator)
    model.load_state_dict(weights)
    # The original predictor's inference script feeds CLIP's own preprocess (Resize bicubic, CenterCrop,
    # ToTensor, Normalize), the same Compose ImageReward copies as _transform.
    preprocess = ir_module._transform(TINY_SIZE)
    scores = model(pixel_values=tensor_transforms(preprocess)(images)).logits.squeeze(-1)
    scores_pil = torch.cat([model(pixel_values=preprocess(p)[None]).logits.squeeze(-1) for p in pil_images])
    return codes, exponents, scores, scores_pil


@torch.no_grad()
def imagereward_reference(images, pil_images, ir_module, blip_pretrain, VisionTransformer, generator, med_path):
    blip_pretrain.init_tokenizer = tiny_tokenizer  # the real one downloads bert-base-uncased
    blip_pretrain.create_vit = lambda *args, **kwargs: (VisionTransformer(**TINY_VIT), TINY_VIT["embed_dim"])
    model = ir_module.ImageReward(med_config=med_path, device="cpu")
    # ImageReward hard-codes MLP(768) (BERT-base's width) and _transform(224); at the tiny width and size we
    # rebuild both with the reference's own classes.
    model.mlp = ir_module.MLP(model.blip.text_encoder.config.hidden_size)
    model.preprocess = ir_module._transform(TINY_SIZE)
    model.eval()
    codes, exponents, weights = randomise(model.state_dict(), generator)
    model.load_state_dict(weights)
    text = model.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    pixels = tensor_transforms(model.preprocess)(images)
    scores = model.score_gard(text.input_ids, text.attention_mask, pixels).squeeze(-1)
    scores_pil = torch.tensor([model.score(prompt, p) for prompt, p in zip(PROMPTS, pil_images)])
    return codes, exponents, text, scores, scores_pil, (model.mean, model.std)


def published_keys(ir_module, blip_pretrain, VisionTransformer, tmp_med_path):
    """name -> shape of the tensors in ImageReward.pt and sac+logos+ava1-l14-linearMSE.pth, from the reference
    classes built at the real configuration (on the CPU, ~2 GB for a minute: the ViT's stochastic-depth rule
    calls .item(), which the meta device refuses)."""
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPVisionConfig

    from ImageReward.models.BLIP import blip

    blip_pretrain.create_vit = blip.create_vit
    imagereward = ir_module.ImageReward(med_config=tmp_med_path, device="cpu")
    aesthetic = AestheticsPredictorV2Linear(CLIPVisionConfig(**CLIP_L14_VISION))
    return {
        # ImageReward.pt is the state_dict of the whole ImageReward module.
        "imagereward": {k: list(v.shape) for k, v in imagereward.state_dict().items()},
        # The .pth is the state_dict of the predictor's MLP module, whose Sequential is named `layers`.
        "aesthetic": {f"layers.{k}": list(v.shape) for k, v in aesthetic.layers.state_dict().items()},
    }


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2512_15347)
    os.makedirs(os.path.join(HERE, "tiny_bert"), exist_ok=True)
    with open(os.path.join(HERE, "tiny_bert", "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS, ",", "."]) + "\n")
    tiny_med = {**BLIP_MED_CONFIG, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": 40,
                "vocab_size": len(tiny_tokenizer())}
    med_path, real_med_path = os.path.join(HERE, "_tiny_med.json"), os.path.join(HERE, "_real_med.json")
    for path, config in ((med_path, tiny_med), (real_med_path, BLIP_MED_CONFIG)):
        with open(path, "w") as f:
            json.dump(config, f)

    ir_module, blip_pretrain, VisionTransformer = import_imagereward()
    images_u8 = make_images(generator)
    images = images_u8.float() / 255
    pil_images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images_u8]

    a_codes, a_exp, a_scores, a_scores_pil = aesthetic_reference(images, pil_images, ir_module, generator)
    i_codes, i_exp, text, i_scores, i_scores_pil, i_norm = imagereward_reference(
        images, pil_images, ir_module, blip_pretrain, VisionTransformer, generator, med_path)
    keys = published_keys(ir_module, blip_pretrain, VisionTransformer, real_med_path)
    os.remove(med_path)
    os.remove(real_med_path)

    tensors = {"images_uint8": images_u8}
    tensors.update({f"aesthetic/{k}": v.contiguous() for k, v in a_codes.items()})
    tensors.update({f"imagereward/{k}": v.contiguous() for k, v in i_codes.items()})
    save_file(tensors, os.path.join(HERE, "scorers_tiny.safetensors"))
    record = {
        "made_by": "repro/reference/make_scorer_vectors.py",
        "versions": {p: version(p) for p in ("torch", "torchvision", "transformers", "timm", "fairscale",
                                              "image-reward", "simple-aesthetics-predictor")},
        "images": "images_uint8 / 255, (N, 3, 48, 64)",
        "prompts": PROMPTS,
        "aesthetic": {"clip_vision_config": TINY_CLIP_VISION, "size": TINY_SIZE, "exponents": a_exp,
                      "scores": a_scores.tolist(), "scores_pil": a_scores_pil.tolist()},
        "imagereward": {"med_config": tiny_med, "vit": TINY_VIT, "size": TINY_SIZE, "exponents": i_exp,
                        "input_ids": text.input_ids.tolist(), "attention_mask": text.attention_mask.tolist(),
                        "mean": i_norm[0], "std": i_norm[1],
                        "scores": i_scores.tolist(), "scores_pil": i_scores_pil.tolist()},
    }
    with open(os.path.join(HERE, "scorers_tiny.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(HERE, "scorers_published_keys.json"), "w") as f:
        json.dump({"med_config": BLIP_MED_CONFIG, "vit": BLIP_VIT_LARGE, "clip_vision": CLIP_L14_VISION, **keys},
                  f, indent=0)
    print("aesthetic", a_scores.tolist(), a_scores_pil.tolist())
    print("imagereward", i_scores.tolist(), i_scores_pil.tolist())


if __name__ == "__main__":
    main()
