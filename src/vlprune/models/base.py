"""What both model families share (ALBEF-style two-stream, ViLT-style single-stream): the reduction-slot mixin
(``ReductionSlots``), the result of a text-guided pass over image-caption pairs (``PairEncoding``) and BERT's MLM
head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..reduce.registry import clear_method_state
from ..reduce.state import TokenState
from .attention import activation


@dataclass
class PairEncoding:
    """One text-guided pass over image-caption pairs, the same on both model families (``model.encode_pair``).

    cls: (B, D) the multimodal [CLS] the task heads read (ALBEF: the fused [CLS]; ViLT: the pooled [CLS]);
    image: the image TokenState after every reduction (its aux records and traces cover all of them);
    encoder_tokens: (B, T, D) the image tokens after the image encoder (ViLT: after the joint encoder)."""

    cls: Tensor
    image: TokenState
    encoder_tokens: Tensor


class MLMHead(nn.Module):
    """BERT's LM prediction head: dense -> act -> LayerNorm -> decoder tied to the word embeddings."""

    def __init__(self, width: int, vocab: int, act: str, eps: float, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = activation(act)
        self.ln = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self._tied = [word_embeddings]  # a list so that the embedding is not registered twice

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.ln(self.act(self.dense(x))), self._tied[0].weight, self.bias)


class ReductionSlots:
    """Mixin: the models' reduction slots and their management."""

    def _init_model(self, cfg: ModelConfig, arch: str) -> None:
        """What both model families set first: the checked config, no method, no task heads."""
        if cfg.arch != arch:
            raise ValueError(f"{type(self).__name__} needs arch={arch!r}, got {cfg.arch!r}")
        self.cfg = cfg
        self.method_config = None
        self.task_heads = nn.ModuleDict()  # filled by vlprune.models.heads.add_task_head

    @staticmethod
    def _check_pairs(images: Tensor, ids: Tensor) -> None:
        if images.shape[0] != ids.shape[0]:
            raise ValueError(f"image batch ({images.shape[0]}) and caption batch ({ids.shape[0]}) differ in size")

    def reduction_slots(self) -> Dict[str, List[nn.Module]]:  # pragma: no cover - overridden
        raise NotImplementedError

    def clear_reducers(self) -> None:
        """Remove the installed method: empty every slot, drop the modules it added (its ``owns``) and undo what
        else it set (its ``clear``)."""
        for layers in self.reduction_slots().values():
            for layer in layers:
                layer.reducer = None
        clear_method_state(self)
        self.method_config = None

    def reducers(self) -> Dict[str, nn.Module]:
        """The installed reducers by slot name, e.g. ``{"vision.5": TripsReducer(...)}`` (1-based layer numbers)."""
        out = {}
        for group, layers in self.reduction_slots().items():
            for i, layer in enumerate(layers):
                if layer.reducer is not None:
                    out[f"{group}.{i + 1}"] = layer.reducer
        return out


__all__ = ["PairEncoding", "MLMHead", "ReductionSlots"]
