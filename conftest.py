"""Test-session environment, set before anything imports transformers, diffusers or triton."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an offline from_pretrained of a hub id can otherwise hang for minutes
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through the interpreter

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny random SD3, SD1 and FLUX.1-dev-shaped pipelines saved as diffusers folders (flow/, ddim/, flux/)
    with colour prompts."""
    from repro.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """The tiny SD3 pipeline in fp32 with a rank-4 LoRA, two prompts and their text embeddings (one per module)."""
    import progrpo

    pipe = progrpo.load_pipeline(str(tiny_dir / "flow"), torch.float32)
    params = progrpo.trainable_parameters(pipe, progrpo.Args(rank=4, lora_alpha=8))
    prompts = ["a red cat", "a blue dog"]
    return pipe, params, prompts, progrpo.encode_prompts(pipe, prompts, 16)
