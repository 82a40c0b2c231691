"""What both model families share (ALBEF-style two-stream, ViLT-style single-stream): the reduction-slot mixin
(``ReductionSlots``), the result of a text-guided pass over image-caption pairs (``PairEncoding``), BERT's MLM
head and activation checkpointing of the transformer blocks (``set_grad_checkpointing``, ``run_block``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..reduce.registry import clear_method_state
from ..reduce.state import ReduceContext, TokenState
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


# -- activation checkpointing ----------------------------------------------------------------------------------
# A block (ViT layer, text / fusion layer, ViLT joint layer) has the class attribute ``grad_checkpointing = False``;
# ``set_grad_checkpointing`` sets it per instance and the encoders call their blocks through ``run_block``. A
# checkpointed block keeps only its inputs during the forward pass and runs again in the backward pass to rebuild
# what its gradients need. Running again must reproduce the first run exactly, reduction included:
# - dropout and draws from torch's global generators: torch.utils.checkpoint restores those (preserve_rng_state);
# - draws from the run's own generator (``ReduceContext.generator``: random's indices, DynamicViT's and TiP's
#   Gumbel noise): each run of the block draws from a private copy of that generator taken before the first run,
#   and the run's generator is then advanced to where the first run left the copy. So the recomputation draws the
#   same numbers, and the generator ends where it would have without checkpointing.
# Reductions return new TokenStates and keep no state in their modules, so running a block twice has no other effect.


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing of every transformer block of ``model`` on or off; returns the number of
    blocks. It acts in training only (``model.train()`` with gradients enabled); inference runs as before."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    blocks = [m for m in model.modules() if hasattr(type(m), "grad_checkpointing")]
    for m in blocks:
        m.grad_checkpointing = enabled
    return len(blocks)


def _context_arg(args: tuple) -> Optional[int]:
    """The position of the ReduceContext carrying a generator among ``args``, or None."""
    for i, a in enumerate(args):
        if isinstance(a, ReduceContext) and a.generator is not None:
            return i
    return None


def run_block(block: nn.Module, *args: Any) -> Any:
    """``block(*args)``, checkpointed (torch.utils.checkpoint, use_reentrant=False) when the block's
    ``grad_checkpointing`` is on, it is in training mode and gradients are enabled."""
    if not (block.grad_checkpointing and block.training and torch.is_grad_enabled()):
        return block(*args)
    i = _context_arg(args)
    if i is None:
        return checkpoint(block, *args, use_reentrant=False)
    gen = args[i].generator
    start = gen.get_state()
    end: List[Tensor] = []

    def replay(*a: Any) -> Any:
        g = torch.Generator(device=gen.device)
        g.set_state(start)
        a = a[:i] + (dataclasses.replace(a[i], generator=g),) + a[i + 1:]
        out = block(*a)
        if not end:
            end.append(g.get_state())
        return out

    out = checkpoint(replay, *args, use_reentrant=False)
    gen.set_state(end[0])
    return out


__all__ = ["PairEncoding", "MLMHead", "ReductionSlots", "run_block", "set_grad_checkpointing"]
