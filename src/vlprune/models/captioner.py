"""The ALBEF-style captioner: the two-stream model's own text + fusion stack run as a causal decoder.

Every text-encoder and fusion layer attends causally to the caption so far; the fusion layers also cross-attend
to the image tokens that survive reduction; the LM head is the model's MLM head (so a pre-trained checkpoint starts
with a trained LM head). Nothing is added to the model: the functions here read the layers' own weights.

Decoding with a cache (``DecoderCache``): the cross-attention keys / values of the reduced image are computed once
per image (``image_kv``) and repeated per beam; each layer keeps the self-attention keys / values of the tokens
decoded so far, so a step costs one token. ``decode(..., cache=None)`` is the plain full-sequence pass (training,
and the reference the cached path is tested against).

Shapes: ids (B, L); image tokens (B, T, Dv); hidden (B, L, D); logits (B, L, V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reduce.registry import installed_spec
from ..reduce.state import TokenState


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The captioner's layers in order: the text encoder's (self-attention only), then the fusion layers."""
    if getattr(getattr(model, "cfg", None), "arch", None) != "albef":
        arch = getattr(getattr(model, "cfg", None), "arch", type(model).__name__)
        raise ValueError(f"the captioner needs a two-stream model (arch='albef'), got {arch!r}")
    return list(model.text.layers) + list(model.fusion.layers)


def check_caption_method(model: nn.Module, guide: Optional[str] = None) -> None:
    """Captioning has no text before the image: a text-guided method raises unless ``guide="prompt"``; a method
    that reduces inside the fusion layers (TiP) raises (the decoder's cache holds one reduced image per step)."""
    if guide not in (None, "prompt"):
        raise ValueError(f"guide must be None or 'prompt', got {guide!r}")
    spec = installed_spec(model)
    if spec is None:
        return
    if any(k.startswith("fusion.") for k in model.reducers()):
        raise ValueError(f"method {spec.name!r} reduces inside the fusion layers; the captioner supports methods that "
                         "reduce in the image encoder only")
    if spec.text_guided and guide != "prompt":
        raise ValueError(f"method {spec.name!r} is text-guided, and a caption has no text before the image; use an "
                         "image-only method or guide='prompt' (the prompt's text [CLS] guides the reduction)")


def causal_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) key mask (1 = real token) -> additive (B, 1, L, L) bias: causal and padding."""
    L = mask.shape[1]
    allowed = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()[None, None] & (mask[:, None, None, :] > 0)
    neg = torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, neg)


@dataclass
class DecoderCache:
    """Per layer: self-attention keys / values so far (B, H, t, d) (None before the first step), and the
    cross-attention keys / values of the image (B, H, T, d) (None in the text-encoder layers)."""

    self_kv: List[Optional[Tuple[Tensor, Tensor]]]
    cross_kv: List[Optional[Tuple[Tensor, Tensor]]]
    past_mask: Optional[Tensor] = None  # (B, t) key mask of the tokens decoded so far
    length: int = 0
    cross_bias: Optional[Tensor] = None  # (B, 1, 1, T) masked-out image tokens of a masked training path, or None

    def repeat(self, n: int) -> "DecoderCache":
        """Each row repeated ``n`` times consecutively (beam expansion: row b -> rows b*n .. b*n+n-1)."""
        rep = lambda kv: None if kv is None else tuple(t.repeat_interleave(n, 0) for t in kv)  # noqa: E731
        pm = None if self.past_mask is None else self.past_mask.repeat_interleave(n, 0)
        cb = None if self.cross_bias is None else self.cross_bias.repeat_interleave(n, 0)
        return DecoderCache([rep(kv) for kv in self.self_kv], [rep(kv) for kv in self.cross_kv], pm, self.length, cb)

    def select(self, rows: Tensor) -> "DecoderCache":
        """Rows ``rows`` (beam search reordering)."""
        sel = lambda kv: None if kv is None else tuple(t[rows] for t in kv)  # noqa: E731
        pm = None if self.past_mask is None else self.past_mask[rows]
        cb = None if self.cross_bias is None else self.cross_bias[rows]
        return DecoderCache([sel(kv) for kv in self.self_kv], [sel(kv) for kv in self.cross_kv], pm, self.length, cb)


def image_kv(model: nn.Module, image: TokenState) -> DecoderCache:
    """An empty cache holding the cross-attention keys / values of the (reduced) image tokens, once per image."""
    layers = decoder_layers(model)
    cross = []
    for layer in layers:
        if layer.cross is None:
            cross.append(None)
            continue
        a = layer.cross
        k, v = a._split(a.kv(image.x), 2).unbind(0)
        cross.append((k, v))
    return DecoderCache([None] * len(layers), cross, cross_bias=image.cross_attention_bias(image.x.dtype))


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout: float) -> Tensor:
    B, H, Lq, d = q.shape
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    return out.transpose(1, 2).reshape(B, Lq, H * d)


def _explicit(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], probs: List[Tensor]) -> Tensor:
    """``_attend`` (no dropout) with the attention probabilities (B, H, Lq, T) made explicit, kept in the autograd
    graph and appended to ``probs``."""
    B, H, Lq, d = q.shape
    logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    A = (logits if bias is None else logits + bias.to(q.dtype)).softmax(-1)
    probs.append(A)
    return (A @ v).transpose(1, 2).reshape(B, Lq, H * d)


def _layer(layer: nn.Module, x: Tensor, bias: Tensor, kv: Optional[Tuple[Tensor, Tensor]],
           cross: Optional[Tuple[Tensor, Tensor]], cross_bias: Optional[Tensor],
           train: bool, probs: Optional[List[Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One post-norm layer (``models.text.TextLayer``'s maths) on new tokens x (B, l, D); ``kv``: cached
    self-attention keys / values of earlier tokens; returns (output, keys / values incl. the new tokens).
    ``probs``: a list that receives the cross-attention probabilities (computed explicitly, for Grad-CAM)."""
    a = layer.attn
    p = a.dropout if train else 0.0
    q, k, v = a._split(a.qkv(x), 3).unbind(0)
    if kv is not None:
        k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
    x = layer.attn_ln(x + layer.drop(a.proj(_attend(q, k, v, bias, p))))
    if layer.cross is not None:
        c = layer.cross
        if cross is None:
            raise ValueError("a fusion layer needs the image's keys and values (image_kv)")
        cq = c._split(c.q(x), 1)[0]
        att = (_attend(cq, cross[0], cross[1], cross_bias, p) if probs is None
               else _explicit(cq, cross[0], cross[1], cross_bias, probs))
        x = layer.cross_ln(x + layer.drop(c.proj(att)))
    return layer.mlp_ln(x + layer.mlp(x)), (k, v)


def decode(model: nn.Module, ids: Tensor, mask: Tensor, cache: DecoderCache, use_cache: bool = False) -> Tuple[Tensor, DecoderCache]:
    """Logits (B, l, V) of the new tokens ``ids`` (B, l) given ``cache`` (the image and, with ``use_cache``, the
    tokens before). ``mask`` (B, l) marks real tokens. Without ``use_cache`` the cache's self-attention part is
    ignored and ``ids`` is the whole sequence from position 0."""
    layers = decoder_layers(model)
    emb = model.text.embeddings
    start = cache.length if use_cache else 0
    l = ids.shape[1]
    if start + l > emb.position.num_embeddings:
        raise ValueError(f"caption length {start + l} exceeds the model's max_len {emb.position.num_embeddings}")
    pos = torch.arange(start, start + l, device=ids.device)
    x = emb.drop(emb.ln(emb.word(ids) + emb.position(pos)[None] + emb.token_type(torch.zeros_like(ids))))
    past = cache.past_mask if (use_cache and cache.past_mask is not None) else mask[:, :0]
    full = torch.cat([past, mask], dim=1)
    bias = causal_bias(full, x.dtype)[:, :, start:]  # the new rows of the causal mask
    train = model.training
    new_kv = []
    for i, layer in enumerate(layers):
        x, kv = _layer(layer, x, bias, cache.self_kv[i] if use_cache else None, cache.cross_kv[i], cache.cross_bias,
                       train)
        new_kv.append(kv)
    logits = model.mlm_head(x)
    return logits, DecoderCache(new_kv, cache.cross_kv, full, start + l, cache.cross_bias)


def cross_attention_probs(model: nn.Module, ids: Tensor, mask: Tensor, cache: DecoderCache,
                          layer: int) -> Tuple[Tensor, Tensor]:
    """(logits (B, L, V), cross-attention probabilities (B, H, L, T) of fusion layer ``layer``, 0-based) of the
    whole sequences ``ids`` in eval mode, both in the autograd graph: ``decode`` for Grad-CAM."""
    layers = decoder_layers(model)
    first = len(layers) - len(model.fusion.layers)
    if not 0 <= layer < len(model.fusion.layers):
        raise ValueError(f"fusion layer must be in [0, {len(model.fusion.layers) - 1}] (0-based), got {layer}")
    emb = model.text.embeddings
    pos = torch.arange(ids.shape[1], device=ids.device)
    x = emb.ln(emb.word(ids) + emb.position(pos)[None] + emb.token_type(torch.zeros_like(ids)))
    bias = causal_bias(mask, x.dtype)
    probs: List[Tensor] = []
    for i, lyr in enumerate(layers):
        x, _ = _layer(lyr, x, bias, None, cache.cross_kv[i], cache.cross_bias, False,
                      probs if i == first + layer else None)
    return model.mlm_head(x), probs[0]


def lm_loss(logits: Tensor, labels: Tensor, smoothing: float = 0.1) -> Tensor:
    """Next-token cross-entropy (label smoothing ``smoothing``), mean over labelled tokens (label -100 = none):
    logits (B, L, V) predict labels shifted by one."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    tgt = labels[:, 1:].reshape(-1)
    if not (tgt != -100).any():
        raise ValueError("no labelled token in the batch (every caption is only the prompt)")
    return F.cross_entropy(pred, tgt, ignore_index=-100, label_smoothing=smoothing)


def repetition_penalty(logits: Tensor, seqs: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty as Hugging Face applies it: for tokens already in ``seqs`` (N, t), positive logits are
    divided by ``penalty`` and negative ones multiplied. logits (N, V)."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, seqs)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, seqs, seen)


@dataclass
class GenerateConfig:
    """BLIP's captioning settings: 3 beams, max_length 20 and min_length 5 counting the prompt tokens,
    repetition_penalty 1.0. ``eos`` ends a caption; ``pad`` fills finished rows."""

    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    eos: int = 3
    pad: int = 0
    forbid: Tuple[int, ...] = field(default_factory=tuple)  # token ids never generated (specials)

    def check(self) -> None:
        if int(self.num_beams) < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= int(self.min_length) <= int(self.max_length):
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def _next_logprobs(logits: Tensor, seqs: Tensor, length: int, gc: GenerateConfig) -> Tensor:
    """Log-probabilities (N, V) of the next token with the penalties and bans applied."""
    logits = repetition_penalty(logits.float(), seqs, gc.repetition_penalty)
    if gc.forbid:
        logits[:, list(gc.forbid)] = -math.inf
    if length < gc.min_length:
        logits[:, gc.eos] = -math.inf
    return logits.log_softmax(-1)


@torch.no_grad()
def greedy(model: nn.Module, cache: DecoderCache, prompt: Tensor, gc: GenerateConfig, use_cache: bool = True) -> Tensor:
    """Greedy decoding: prompt (B, P) (no padding) -> sequences (B, <= max_length) incl. the prompt, padded with
    ``gc.pad`` after eos. ``use_cache=False`` re-runs the whole sequence every step (the reference)."""
    gc.check()
    seqs = prompt
    B = prompt.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    logits, cache = decode(model, prompt, torch.ones_like(prompt), cache, use_cache=True)
    while seqs.shape[1] < gc.max_length:
        lp = _next_logprobs(logits[:, -1], seqs, seqs.shape[1], gc)
        tok = lp.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, gc.pad), tok)
        seqs = torch.cat([seqs, tok[:, None]], dim=1)
        done = done | (tok == gc.eos)
        if bool(done.all()) or seqs.shape[1] >= gc.max_length:
            break
        if use_cache:
            logits, cache = decode(model, tok[:, None], torch.ones_like(tok[:, None]), cache, use_cache=True)
        else:
            logits, _ = decode(model, seqs, torch.ones_like(seqs), cache)
    return seqs


@torch.no_grad()
def beam_search(model: nn.Module, cache: DecoderCache, prompt: Tensor, gc: GenerateConfig) -> Tensor:
    """Batched beam search with the cache: ``gc.num_beams`` beams per image (the image's keys / values repeated
    per beam, computed once). A hypothesis ends at eos; an image is done when it has ``num_beams`` ended
    hypotheses (early stopping) or at ``max_length``; the best by sum log-prob / length ** length_penalty wins.
    With one beam this is greedy decoding. Returns (B, <= max_length) sequences padded with ``gc.pad``."""
    gc.check()
    K = int(gc.num_beams)
    B, P = prompt.shape
    dev = prompt.device
    seqs = prompt.repeat_interleave(K, 0)  # (B*K, t)
    cache = cache.repeat(K)
    scores = torch.zeros(B, K, device=dev)
    scores[:, 1:] = -math.inf  # the beams start identical: only the first expands at step one
    finished: List[List[Tuple[float, Tensor]]] = [[] for _ in range(B)]
    done = [False] * B
    logits, cache = decode(model, seqs, torch.ones_like(seqs), cache, use_cache=True)
    while True:
        t = seqs.shape[1]
        lp = _next_logprobs(logits[:, -1], seqs, t, gc)  # (B*K, V)
        V = lp.shape[-1]
        cand = (scores.view(B * K, 1) + lp).view(B, K * V)
        top, idx = cand.topk(2 * K, dim=1)  # enough for K live beams after removing eos candidates
        beam, tok = idx // V, idx % V
        rows, toks, new_scores = [], [], []
        for b in range(B):
            kept = 0
            for rank, (s, k, w) in enumerate(zip(top[b].tolist(), beam[b].tolist(), tok[b].tolist())):
                if done[b]:
                    break
                if w == gc.eos:  # as Hugging Face: an eos ranked below the top num_beams candidates is ignored
                    if rank < K and len(finished[b]) < K and s > -math.inf:
                        hyp = torch.cat([seqs[b * K + k], torch.tensor([w], device=dev)])
                        finished[b].append((s / (hyp.numel() - P) ** gc.length_penalty, hyp))
                    continue
                rows.append(b * K + k)
                toks.append(w)
                new_scores.append(s)
                kept += 1
                if kept == K:
                    break
            if len(finished[b]) >= K:
                done[b] = True
            while kept < K:  # a done image (or one short of candidates) keeps dummy beams
                rows.append(b * K)
                toks.append(gc.pad)
                new_scores.append(-math.inf)
                kept += 1
        rows_t = torch.tensor(rows, device=dev)
        tok_t = torch.tensor(toks, device=dev)
        seqs = torch.cat([seqs[rows_t], tok_t[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=dev).view(B, K)
        if all(done) or seqs.shape[1] >= gc.max_length:
            break
        logits, cache = decode(model, tok_t[:, None], torch.ones_like(tok_t[:, None]), cache.select(rows_t), use_cache=True)
    out = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:  # max_length reached: the live beams count too
            for k in range(K):
                s = float(scores[b, k])
                if s > -math.inf:
                    hyps.append((s / (seqs.shape[1] - P) ** gc.length_penalty, seqs[b * K + k]))
        out.append(max(hyps, key=lambda h: h[0])[1])
    L = max(h.numel() for h in out)
    res = torch.full((B, L), gc.pad, dtype=torch.long, device=dev)
    for b, h in enumerate(out):
        res[b, : h.numel()] = h
    return res


def strip_generated(seqs: Tensor, prompt_len: int, eos: int) -> List[List[int]]:
    """The generated token ids of each sequence, after the prompt, up to (not including) eos."""
    out = []
    for row in seqs[:, prompt_len:].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out
