"""The state a reduction receives and returns, passed explicitly from layer to layer.

Tensor letters: B batch, T tokens now (index 0 = image [CLS]), N original patches, D width, H heads, L text length.
Nothing here is shared between layers or calls: every reduction returns a new ``TokenState``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

import torch
from torch import Tensor

# token kinds in a LayerTrace
CLS, KEPT, FUSED, MERGED = 0, 1, 2, 3


@dataclass(frozen=True)
class LayerTrace:
    """What one reduction did, recorded only when tracing is on (``trace=True`` in the encoder call).

    ``layer`` is 1-based, as everywhere user-facing. ``tokens`` is the number of tokens after the reduction
    (incl. [CLS]). ``source`` (B, T, 1 + N) marks which original tokens each surviving token covers (column 0 is
    the image [CLS]; an original patch with no mark was dropped). ``kind`` (B, T) holds CLS / KEPT / FUSED / MERGED.
    ``mask`` (B, T) is the hard keep mask of a masked training path (then nothing is removed), else None.
    """

    layer: int
    method: str
    tokens: int
    source: Optional[Tensor]
    kind: Optional[Tensor]
    mask: Optional[Tensor] = None


@dataclass(frozen=True)
class AuxRecord:
    """Training signals one learned reduction hands to its losses (DynamicViT, TiP), recorded per reduction.

    ``layer`` is 1-based; ``values`` maps names to tensors (e.g. ``{"keep_prob": (B, M), "mask": (B, M)}``); what
    each method records is documented in its module. Records travel inside the TokenState (no shared state).
    """

    layer: int
    method: str
    values: Mapping[str, Any]


# On a masked training path whose mask carries gradients (straight-through), masked keys get the additive bias
# log(POLICY_FLOOR) instead of finfo.min: the bias is log(p (1 - floor) + floor) of the keep policy p, so that the
# gradient reaching p is DynamicViT's (attention multiplied by the policy and renormalised), finite for p = 0 and
# p = 1 alike. A masked key's forward weight is then 1e-20 of a kept one's, i.e. zero at fp32/bf16 precision.
POLICY_FLOOR = 1e-20


def policy_bias(policy: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention bias log(p (1 - floor) + floor) of a 0/1 keep policy p that carries gradients."""
    p = policy.to(torch.promote_types(policy.dtype, torch.float32))
    return torch.log(p * (1.0 - POLICY_FLOOR) + POLICY_FLOOR).to(dtype)


@dataclass(frozen=True)
class TokenState:
    """Image tokens between layers.

    x:      (B, T, D) tokens, index 0 = image [CLS], never removed or merged.
    size:   (B, T) how many original tokens each token stands for ([CLS] 1, a patch 1, a merge the sum).
    source: (B, T, 1 + N) 0/1 provenance over the original tokens, or None when not traced (the cheap default).
    mask:   (B, T) keep mask of masked training paths (1 keep, 0 masked out of attention), or None.
    prop_attn: add log(size) to attention logits (ToMe's proportional attention) in the layers that follow.
    trace:  LayerTrace records so far; None when not tracing.
    aux:    AuxRecord training signals of learned reductions (always recorded; cheap references).
    """

    x: Tensor
    size: Tensor
    source: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    prop_attn: bool = False
    trace: Optional[Tuple[LayerTrace, ...]] = None
    aux: Tuple[AuxRecord, ...] = ()

    @staticmethod
    def start(x: Tensor, trace: bool = False) -> "TokenState":
        """State for freshly embedded tokens ``x`` (B, 1 + N, D)."""
        B, T, _ = x.shape
        size = torch.ones(B, T, device=x.device, dtype=x.dtype)
        source = None
        if trace:
            source = torch.eye(T, device=x.device, dtype=torch.bool).unsqueeze(0).expand(B, T, T).clone()
        return TokenState(x=x, size=size, source=source, trace=() if trace else None)

    def replace(self, **changes) -> "TokenState":
        return dataclasses.replace(self, **changes)

    @property
    def tracing(self) -> bool:
        return self.trace is not None

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def record(self, layer_index: int, method: str, kind: Optional[Tensor] = None) -> "TokenState":
        """Append a LayerTrace for 0-based ``layer_index`` when tracing (a no-op otherwise)."""
        if self.trace is None:
            return self
        if kind is None:
            kind = torch.full(self.x.shape[:2], KEPT, dtype=torch.long, device=self.x.device)
            kind[:, 0] = CLS
        mask = None if self.mask is None else (self.mask > 0)
        rec = LayerTrace(layer_index + 1, method, self.num_tokens, self.source, kind, mask)
        return self.replace(trace=self.trace + (rec,))

    def add_aux(self, layer_index: int, method: str, **values: Any) -> "TokenState":
        """Append an AuxRecord for 0-based ``layer_index`` holding ``values``."""
        return self.replace(aux=self.aux + (AuxRecord(layer_index + 1, method, dict(values)),))

    def attn_bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        """Additive float attention mask for self-attention over these tokens, or None.

        Proportional attention adds log(size) over keys: (B, 1, 1, T). A training mask removes masked keys for
        every query except the token itself (a token always attends to itself): (B, 1, T, T); only the training
        paths of learned methods build it.
        """
        bias = None
        if self.prop_attn:
            bias = self.size.log().to(dtype)[:, None, None, :]
        if self.mask is not None:
            neg = torch.finfo(dtype).min
            T = self.num_tokens
            eye = torch.eye(T, device=self.x.device, dtype=torch.bool)
            if self.mask.requires_grad:  # differentiable policy (see POLICY_FLOOR)
                p = self.mask[:, None, None, :]
                m = policy_bias(p + (1 - p) * eye, dtype)
            else:
                allowed = (self.mask[:, None, None, :] > 0) | eye
                m = torch.zeros(allowed.shape, device=self.x.device, dtype=dtype).masked_fill(~allowed, neg)
            bias = m if bias is None else (bias + m).clamp_min(neg)
        return bias

    def cross_attention_bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        """Additive mask (B, 1, 1, T) for the fusion encoder's text queries cross-attending to these tokens: only
        masked-out keys of a training path (or None). It deliberately does not add log(size): ToMe's proportional
        attention belongs to the merged tokens' own self-attention (as in ToMe, which has no cross-attention), and
        the fusion encoder is trained and evaluated without it. A guide row scored as if it were one of the
        tokens' own queries uses ``reduce.select.outside_query_bias`` instead, which does add log(size)."""
        if self.mask is None:
            return None
        if self.mask.requires_grad:  # differentiable policy (see POLICY_FLOOR)
            return policy_bias(self.mask[:, None, None, :], dtype)
        neg = torch.finfo(dtype).min
        keep = self.mask[:, None, None, :] > 0
        return torch.zeros(keep.shape, device=self.x.device, dtype=dtype).masked_fill(~keep, neg)


@dataclass(frozen=True)
class ReduceContext:
    """Everything a reduction may read besides the tokens, passed explicitly.

    guide:     (B, D) text guidance: the text encoder's final [CLS] (TRIPS, ELIP) or a multimodal [CLS].
    text:      (B, L, D) text token states, text_mask (B, L) 1 = real token (for methods that pool the text).
    generator: randomness for random selection and Gumbel noise.
    layer:     0-based index of the layer calling the reduction (set by the encoder).
    encoder:   the encoder running (for look-ahead methods such as ELIP), set by the encoder.
    num_patches: N, the number of original image patches of this forward pass (set by the image encoder), for
               methods whose keep counts are fractions of the original patch count (ELIP).
    """

    guide: Optional[Tensor] = None
    text: Optional[Tensor] = None
    text_mask: Optional[Tensor] = None
    generator: Optional[torch.Generator] = None
    layer: int = 0
    encoder: Optional[torch.nn.Module] = None
    num_patches: Optional[int] = None

    def at(self, layer: int, encoder: torch.nn.Module) -> "ReduceContext":
        return dataclasses.replace(self, layer=layer, encoder=encoder)
