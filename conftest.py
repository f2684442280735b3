"""Test-session environment, set before anything imports transformers, diffusers or triton."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an offline from_pretrained of a hub id can otherwise hang for minutes
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through the interpreter
