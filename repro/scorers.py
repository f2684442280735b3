"""Rewards: the paper's learned training rewards (PickScore, HPSv2.1, CLIP score) and evaluation metrics
(Aesthetic, ImageReward), one preprocessing path for all; and DDPO's weight-free JPEG (in)compressibility.

Each follows progrpo's reward contract: `Name(device)` loads the model once and returns a callable
`(images (N, 3, H, W) float in [0, 1] on any device, prompts: N str) -> (N,) fp32 CPU tensor`, so any one
can be named on the command line as `--reward repro.scorers.PickScore` (alone or in a weighted sum such as
`repro.scorers.HPSv2:1.0,repro.scorers.CLIPScore:1.0`). They live here, not in progrpo.py, as Flow-GRPO keeps
its rewards beside its trainer: the method does not depend on which model scores the images, and training and
the evaluation tables share the scorers. Nothing here downloads at import time; the factories fetch the
published weights on first use (huggingface_hub, or torch.hub for the aesthetic head, which lives on GitHub).

0. PickScore (Kirstain et al. 2023), CLIP score, HPSv2.1 (Wu et al. 2023): cosine of CLIP image and text
   embeddings (PickScore times the logit scale), see ClipScore and HPSv2.

1. Aesthetic: LAION's improved aesthetic predictor v2, head "sac+logos+ava1-l14-linearMSE" (the one
   simple-aesthetics-predictor packages): CLIP ViT-L/14's projected image embedding (transformers'
   CLIPVisionModelWithProjection, openai/clip-vit-large-patch14), L2-normalised, through a linear MLP
   768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropouts between, no activations). Scale: LAION's 1-10 rating
   scale (LAION-Aesthetics keeps images scoring above ~5-6.5). Image only: the prompt is ignored.
2. ImageReward (Xu et al., NeurIPS 2023; `image-reward` on PyPI, hub THUDM/ImageReward): BLIP's ViT-L/16 image
   encoder; BLIP's BERT text encoder reads the prompt while cross-attending to every image token; the [CLS]
   feature goes through the same MLP shape (768 -> ... -> 1), then (r - 0.16717...) / 1.03333..., ImageReward's
   published standardisation: roughly zero-mean, unit-spread scores, higher is preferred.

Implementation choice for ImageReward: transformers' BlipVisionModel and BlipTextModel (the port of BLIP's
med.py that BlipForImageTextRetrieval uses) rather than plain torch. They compute the same layers as the
reference (pre-norm ViT blocks with fused qkv and LayerNorm eps 1e-6; post-norm BERT layers with cross-attention
and eps 1e-12), run in the project's transformers 5 (the reference needs transformers<5, timm 0.6.13, fairscale),
and what is left to us is a key mapping, tested against every published tensor name.

Preprocessing, both scorers: what CLIP's preprocess (copied by ImageReward) does to a PIL image, on tensors:
bicubic resize of the short side, centre crop, CLIP mean/std (`clip_preprocess`).
"""

import io
import json
import pickle

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from progrpo import RunError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

AESTHETIC_HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                      "sac%2Blogos%2Bava1-l14-linearMSE.pth")
# ImageReward.py's standardisation of the raw reward: (r - mean) / std.
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
# BLIP's create_vit("large"), in the reference VisionTransformer's argument names (mlp_ratio 4, qkv_bias).
BLIP_VIT_LARGE = {"img_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
IMAGEREWARD_MAX_TOKENS = 35  # ImageReward.score pads and truncates prompts to 35 BERT tokens


def clip_preprocess(images, size, mean=CLIP_MEAN, std=CLIP_STD):
    """(N, 3, H, W) in [0, 1] -> (N, 3, size, size) normalised, as torchvision's Resize/CenterCrop do it.

    Rounding matters for non-square images: torchvision (which the references' preprocessing is) sizes the
    long side with int() and places the crop with round(). The clamp stands in for the uint8 saturation of
    PIL's resize, which the references run on PIL images.
    """
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    images = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True,
                           align_corners=False).clamp(0, 1)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    images = images[..., top:top + size, left:left + size]
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


class RewardMLP(nn.Module):
    """The head both checkpoints share: in -> 1024 -> 128 -> 64 -> 16 -> 1, all linear (the "linearMSE" head).

    The dropouts do nothing at eval time but keep the Sequential's indices, so the published names
    `layers.0/2/4/6/7.{weight,bias}` are this module's own names.
    """

    def __init__(self, in_features):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x).squeeze(-1)  # (N, in) -> (N,)


def load_mapped(module, state, rename):
    """Load a published state dict into `module` through `rename` (published name -> ours, or None to skip).

    Every tensor of each top-level submodule the checkpoint touches must be set, with the right shape, and no
    published name may be unknown: a checkpoint of another layout fails here with one line, not later with a
    silently half-random model (ImageReward's own loader uses strict=False).
    """
    mapped, source = {}, {}
    for key, value in state.items():
        name = rename(key)
        if name is not None:
            mapped[name], source[name] = value, source.get(name, []) + [key]
    own = module.state_dict()
    roots = {name.split(".")[0] for name in mapped}
    problems = ([f"{' and '.join(keys)} both map to {k}" for k, keys in source.items() if len(keys) > 1]
                + [f"unknown {k}" for k in mapped if k not in own]
                + [f"{k} is {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                   for k, v in mapped.items() if k in own and v.shape != own[k].shape]
                + [f"missing {k}" for k in own if k.split(".")[0] in roots and k not in mapped])
    if problems:
        raise RunError(f"checkpoint does not fit {type(module).__name__}: {'; '.join(problems[:3])}"
                       f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}")
    module.load_state_dict(mapped, strict=False)
    return module


# ----------------------------------------------------------------------------------------------------
# Aesthetic predictor v2
# ----------------------------------------------------------------------------------------------------

class AestheticPredictor(nn.Module):
    """CLIP projected image embedding -> L2 normalise -> RewardMLP: (N, 3, S, S) pixels -> (N,) scores."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip  # a transformers CLIPVisionModelWithProjection
        self.mlp = RewardMLP(clip.config.projection_dim)

    def forward(self, pixels):
        embeds = self.clip(pixel_values=pixels).image_embeds  # (N, projection_dim)
        return self.mlp(F.normalize(embeds, dim=-1))


def aesthetic_key(key):
    """Published name -> ours. The .pth holds the head (`layers.*`); simple-aesthetics-predictor's hub
    conversions also hold the CLIP tower under transformers' own names (`vision_model.*`, `visual_projection.*`)."""
    if key.startswith("layers."):
        return "mlp." + key
    if key.startswith(("vision_model.", "visual_projection.")):
        return "clip." + key
    raise RunError(f"'{key}' is not a tensor of the aesthetic predictor (expected layers.*, vision_model.*)")


class Aesthetic:
    """Reward: LAION aesthetic score (1-10) of each image; prompts are ignored.

    checkpoint: the head's .pth (default: the published sac+logos+ava1-l14-linearMSE.pth), or a whole-model
    state dict in the same names; clip: a transformers CLIPVisionModelWithProjection name or folder.
    """

    def __init__(self, device, checkpoint=None, clip="openai/clip-vit-large-patch14"):
        from transformers import CLIPVisionModelWithProjection

        model = AestheticPredictor(CLIPVisionModelWithProjection.from_pretrained(clip))
        if checkpoint is None:
            state = torch.hub.load_state_dict_from_url(AESTHETIC_HEAD_URL, map_location="cpu")
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.model = load_mapped(model, state, aesthetic_key).eval().requires_grad_(False).to(device)
        self.size = model.clip.config.image_size

    @torch.no_grad()
    def __call__(self, images, prompts):
        device = next(self.model.parameters()).device
        return self.model(clip_preprocess(images.to(device), self.size)).float().cpu()


# ----------------------------------------------------------------------------------------------------
# ImageReward
# ----------------------------------------------------------------------------------------------------

def blip_vision_config(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio=4.0):
    """BLIP's timm-style VisionTransformer arguments -> transformers' BlipVisionConfig (LayerNorm eps 1e-6)."""
    from transformers import BlipVisionConfig

    return BlipVisionConfig(hidden_size=embed_dim, intermediate_size=int(embed_dim * mlp_ratio),
                            num_hidden_layers=depth, num_attention_heads=num_heads, image_size=img_size,
                            patch_size=patch_size, layer_norm_eps=1e-6, hidden_act="gelu")


def blip_text_config(med_config, vision_width):
    """BLIP's med_config.json (a BertConfig) -> BlipTextConfig; cross-attention keys/values read the ViT width.

    is_decoder=True only makes BlipTextLayer build its cross-attention; the forward pass is told
    is_decoder=False, so self-attention is bidirectional, as in BLIP's 'multimodal' encoder mode.
    """
    from transformers import BlipTextConfig

    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    # bos/eos/sep ids only steer generation, which this encoder never does; None keeps tiny vocabularies valid.
    return BlipTextConfig(**{k: med_config[k] for k in keep}, encoder_hidden_size=vision_width, is_decoder=True,
                          bos_token_id=None, eos_token_id=None, sep_token_id=None)


class ImageRewardModel(nn.Module):
    """BLIP image tokens, cross-attended by the prompt's BERT encoder, [CLS] -> RewardMLP -> standardise."""

    def __init__(self, med_config, vit=BLIP_VIT_LARGE):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(blip_vision_config(**vit))
        self.text = BlipTextModel(blip_text_config(med_config, vit["embed_dim"]), add_pooling_layer=False)
        self.mlp = RewardMLP(med_config["hidden_size"])
        self.size = vit["img_size"]

    def forward(self, pixels, input_ids, attention_mask):
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # (N, 1 + patches, vision width)
        # No encoder mask: every image token is attended, as with the reference's all-ones image_atts.
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         is_decoder=False)
        raw = self.mlp(text.last_hidden_state[:, 0])  # (N,) from the [CLS] feature
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


_VIT_BLOCK_NAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                    "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VIT_NAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
              "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
              "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
              "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}


def imagereward_key(key):
    """Published ImageReward.pt name -> ours, or None for tensors scoring never reads.

    blip.visual_encoder.* (timm ViT) -> vision.* (BlipVisionModel), renamed; blip.text_encoder.* -> text.*, the
    same names (BlipTextModel is a port of BLIP's med.py); mlp.* unchanged. Skipped: BLIP's contrastive
    projections blip.vision_proj / blip.text_proj (ImageReward never calls them) and the position_ids buffer.
    """
    if key.startswith("mlp."):
        return key
    if key.startswith(("blip.vision_proj.", "blip.text_proj.")) or key == "blip.text_encoder.embeddings.position_ids":
        return None
    if key.startswith("blip.text_encoder."):
        return "text." + key[len("blip.text_encoder."):]
    if key.startswith("blip.visual_encoder."):
        rest = key[len("blip.visual_encoder."):]
        if rest in _VIT_NAMES:
            return "vision." + _VIT_NAMES[rest]
        parts = rest.split(".")  # blocks.<i>.<module path>.<weight|bias>
        inner = ".".join(parts[2:-1])
        if parts[0] == "blocks" and inner in _VIT_BLOCK_NAMES:
            return f"vision.encoder.layers.{parts[1]}.{_VIT_BLOCK_NAMES[inner]}.{parts[-1]}"
    raise RunError(f"'{key}' is not a tensor of ImageReward (expected blip.visual_encoder.*, blip.text_encoder.*, "
                   f"mlp.*)")


def blip_tokenizer(name_or_path="bert-base-uncased"):
    """BLIP's tokenizer: BERT uncased WordPiece plus the [DEC] and [ENC] tokens BLIP adds (ids 30522, 30523 on
    bert-base-uncased, hence med_config's vocab of 30524); a prompt that spells them tokenises as in BLIP."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(name_or_path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward:
    """Reward: ImageReward's standardised human-preference score of each (image, prompt) pair.

    checkpoint, med_config: ImageReward.pt and med_config.json (default: downloaded from THUDM/ImageReward);
    tokenizer: BERT tokenizer name or folder; vit: the image encoder's size (BLIP's ViT-L, as published).
    """

    def __init__(self, device, checkpoint=None, med_config=None, tokenizer="bert-base-uncased", vit=BLIP_VIT_LARGE):
        if checkpoint is None or med_config is None:
            from huggingface_hub import hf_hub_download

            checkpoint = checkpoint or hf_hub_download("THUDM/ImageReward", "ImageReward.pt")
            med_config = med_config or hf_hub_download("THUDM/ImageReward", "med_config.json")
        with open(med_config) as f:
            model = ImageRewardModel(json.load(f), vit)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.model = load_mapped(model, state, imagereward_key).eval().requires_grad_(False).to(device)
        self.tokenizer = blip_tokenizer(tokenizer)

    def tokenize(self, prompts):
        return self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=IMAGEREWARD_MAX_TOKENS, return_tensors="pt")

    @torch.no_grad()
    def __call__(self, images, prompts):
        device = next(self.model.parameters()).device
        text = self.tokenize(prompts).to(device)
        pixels = clip_preprocess(images.to(device), self.model.size)
        return self.model(pixels, text.input_ids, text.attention_mask).float().cpu()


def clip_cosine(model, pixels, text_inputs):
    """(N,) cosine of a transformers CLIPModel's image and text embeddings; text_inputs: tokenizer output."""
    image_embeds = model.get_image_features(pixel_values=pixels)
    text_embeds = model.get_text_features(**text_inputs)
    # transformers 5 returns model outputs whose pooler_output is the projected embedding; 4.x a tensor
    image_embeds, text_embeds = (e if torch.is_tensor(e) else e.pooler_output for e in (image_embeds, text_embeds))
    return (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)


class ClipScore:
    """A CLIP model through transformers scoring image-prompt agreement: cos(image, text) embeddings.

    PickScore (Kirstain et al. 2023, a CLIP-H fine-tuned on Pick-a-Pic preferences) multiplies by the
    model's logit scale: a typical SD3.5-M image scores ~22. Flow-GRPO trains on PickScore / 26;
    advantages are scale-free, so we keep the paper's raw units. CLIP score is the plain cosine.
    """

    def __init__(self, device, model, processor, logit_scaled):
        from transformers import AutoProcessor, CLIPModel

        self.processor = AutoProcessor.from_pretrained(processor)
        self.model = CLIPModel.from_pretrained(model).eval().requires_grad_(False).to(device)
        self.logit_scaled = logit_scaled

    @torch.no_grad()
    def __call__(self, images, prompts):
        device, config = self.model.device, self.processor.image_processor
        pixels = clip_preprocess(images.to(device), config.crop_size["height"], config.image_mean, config.image_std)
        text = self.processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=77,
                                        return_tensors="pt").to(device)
        cos = clip_cosine(self.model, pixels, text)
        return (self.model.logit_scale.exp() * cos if self.logit_scaled else cos).float().cpu()


def PickScore(device, model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
    return ClipScore(device, model, processor, logit_scaled=True)


def CLIPScore(device, model="openai/clip-vit-large-patch14", processor="openai/clip-vit-large-patch14"):
    return ClipScore(device, model, processor, logit_scaled=False)


def jpeg_size_kb(images):
    """DDPO's compressibility measure: the size of each uint8 image saved as JPEG quality 95, in kB."""
    sizes = []
    for img in (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


def JpegCompressibility(device):
    """DDPO's weight-free reward: minus the JPEG size in kB, so flat, simple images score higher."""
    return lambda images, prompts: -jpeg_size_kb(images)


def JpegIncompressibility(device):
    """DDPO's other weight-free reward: the JPEG size in kB, so detailed images score higher."""
    return lambda images, prompts: jpeg_size_kb(images)


class HPSv2:
    """HPSv2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preference pairs; score = cos.

    A typical SD-v1.4 image scores ~0.25 (the paper: DanceGRPO 0.369, Pro-GRPO 0.391 after training).
    open_clip is imported here, so the package is needed only when this reward is used. The score is
    hpsv2/img_score.py's: its preprocessing, open_clip's tokenizer, the cosine of the normalised features
    (repro/test_hpsv2.py checks it against HPSv2's own code on a tiny model).
    """

    def __init__(self, device, checkpoint=None, arch="ViT-H-14"):
        try:
            import open_clip
        except ImportError:
            raise RunError("the hpsv2 reward needs open_clip: pip install open_clip_torch") from None
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download("xswu/HPSv2", "HPS_v2.1_compressed.pt")
        self.model = open_clip.create_model(arch, pretrained=None)
        try:  # the published file is {'state_dict': tensors}: data, as hpsv2's own torch.load reads it (torch 2.6+)
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # it holds an object: unpickling it would run its class's code
            raise RunError(f"HPSv2 checkpoint '{checkpoint}' holds objects besides tensors and is not loaded (that "
                           "would run their code): use the published HPS_v2.1_compressed.pt") from None
        self.model.load_state_dict(state.get("state_dict", state))
        self.model = self.model.eval().requires_grad_(False).to(device)
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = self.model.visual.image_size
        self.size = size[0] if isinstance(size, tuple) else size

    @staticmethod
    def preprocess(images, size, mean=CLIP_MEAN, std=CLIP_STD):
        """HPSv2's own `preprocess_val` on tensors: antialiased bicubic resize of the longest side to `size`, zero
        padding to a square, OpenAI mean/std. Unlike clip_preprocess it does not clamp, as torchvision's float
        resize does not: the overshoot at hard edges moves a score by up to 1.5e-3."""
        h, w = images.shape[-2:]
        if max(h, w) != size:
            new_h, new_w = round(h * size / max(h, w)), round(w * size / max(h, w))
            images = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True)
            pad_h, pad_w = size - new_h, size - new_w
            images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        mean, std = (torch.tensor(c, device=images.device).view(1, 3, 1, 1) for c in (mean, std))
        return (images.float() - mean) / std

    @torch.no_grad()
    def __call__(self, images, prompts):
        device = next(self.model.parameters()).device
        pixels = self.preprocess(images.to(device), self.size)
        image_embeds = F.normalize(self.model.encode_image(pixels), dim=-1)
        text_embeds = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(device)), dim=-1)
        return (image_embeds * text_embeds).sum(-1).float().cpu()
