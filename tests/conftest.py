"""Shared fixtures: tiny configs (image 32, patch 8, width 32, 4 heads, MLP 37), batch 3 with captions of
different lengths (so that padding is exercised), all on CPU."""

from __future__ import annotations

import pytest
import torch

import vlprune

import fastv_example  # noqa: F401,E402  (registers the example method of docs/methods.md for every test)

# tiny tensors: one intra-op thread per test process avoids oversubscribing 2 cores under pytest-xdist
torch.set_num_threads(1)

LENGTHS = (7, 3, 12)  # real tokens per caption; the batch is padded to the longest


def make_batch(cfg, seed: int = 0, lengths=LENGTHS, pad_to=None):
    """(images, ids, mask) for ``cfg``: images (B, 3, S, S), ids/mask (B, L) with trailing padding."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    L = pad_to or max(lengths)
    S = cfg.vision.image_size
    images = torch.randn(B, 3, S, S, generator=g)
    ids = torch.randint(2, cfg.text.vocab_size, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, cfg.text.pad_token_id)
    ids[:, 0] = 1  # a [CLS]-like first token
    return images, ids, mask


@pytest.fixture
def tiny_cfg():
    return vlprune.load_preset("tiny")


@pytest.fixture
def tiny_vilt_cfg():
    return vlprune.ModelConfig(
        arch="vilt",
        vision=vlprune.VisionConfig(image_size=32, patch_size=8, width=32, layers=4, heads=4, mlp_dim=37),
        text=vlprune.TextConfig(vocab_size=101, width=32, layers=0, heads=4, mlp_dim=37, max_len=40),
        fusion_layers=0,
    )


@pytest.fixture
def batch(tiny_cfg):
    return make_batch(tiny_cfg)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
