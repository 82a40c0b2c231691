"""LAPS — Linguistic-Aware Patch Slimming (seed: the LAPS paper; official code CrossmodalGroup/LAPS lib/cross_net.py).

Where: after both encoders of an ALBEF-style model, on the final patch features; it makes the fine-grained
image-text similarity cheaper and sharper and leaves the ViT alone. ``build_model(..., method="laps")`` attaches a
``LapsHead`` as ``model.laps`` (saved with the model, removed by ``clear_reducers``); no reduction slot is used.
The retrieval task calls ``laps_similarity(model, image, text, text_mask)`` for a batch of images x captions.

Per image-caption pair (P pairs are processed at once, vectorised over images x a chunk of captions):
- projections to the joint width E (``dim`` option, default the model's ``embed_dim``): this head's own
  ``image_proj`` (all image tokens, [CLS] included) and ``text_proj`` (all word states), as the paper's FC layers;
- LPS (paper mode): a^p_i = sigmoid(MLP(v_i)) (Linear(E, E/2) -> GELU -> Linear(E/2, 1)); a^s_i = norm(cos(v_i,
  v_glo)), a^r_i = norm(cos(v_i, t_glo)) with v_glo / t_glo the mean patch / real-word features and norm a min-max
  to [0, 1]; a_i = (1 - beta) a^p_i + beta / 2 (a^s_i + a^r_i), beta = 0.8. a^s and a^r carry no gradient (the
  official code computes them under no_grad). Training: decision D = straight-through Gumbel-softmax over the
  log-probabilities (log a_i, log(1 - a_i)); inference: top ``ceil(rho N)`` by a (rho = ``keep``, default 0.5).
- SPC: W = softmax over the kept tokens of MLP(V_s)^T (LN -> Linear(E, E/5) -> GELU -> Linear(E/5, N_c)),
  N_c = floor(lam rho N), lam = 0.4; aggregated tokens W V_s; the redundant tokens fuse into one token with
  softmax(a) weights over them (renormalised; none when nothing is redundant). Slimmed set [cls, N_c aggregated,
  fused], L2-normalised. In training the softmaxes run over all N tokens restricted by D (``policy_softmax``), the
  same values as the physical selection for the same D, with straight-through gradients into D.
- SPA: A_ij = cos(v_i, t_j) over slimmed image tokens i and real words j; S = mean_i max_j A + mean_j max_i A.

``official=True`` reproduces the released code: no score net and no Gumbel (score = cos(v, v_glo) + cos(v, t_glo),
top-k also in training), leaky-ReLU(0.1) on A; its loss (``objectives.laps``) sums the hinge over all negatives
in the first epoch (``hardest=False``) and uses the hardest negative afterwards.
Choices: cosines (L2-normalised features) in a^s / a^r as the official code; the score net's hidden width E/2;
the aggregation's learnable scale of the official code is left out (the paper does not have it).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as Fn
from .registry import Option, ReduceConfig, register
from .state import TokenState

DEFAULT_KEEP = 0.5
OPTIONS = {"beta": Option(0.8, "float", lo=0.0, hi=1.0), "lam": Option(0.4, "float", lo=0.0, hi=1.0),
           "official": Option(False, "bool"), "dim": Option(None, "int", lo=2, optional=True), "tau": Option(1.0, "positive")}


def masked_word_mean(t: Tensor, mask: Tensor) -> Tensor:
    w = mask.to(t.dtype).unsqueeze(-1)
    return (t * w).sum(1) / w.sum(1).clamp_min(1.0)


def spa_similarity(img: Tensor, words: Tensor, mask: Tensor, leaky: bool = False) -> Tensor:
    """SPA: img (P, Ti, E), words (P, L, E) (both L2-normalised), mask (P, L) 1 = real word -> S (P,).

    S = mean_i max_j A_ij + mean_j max_i A_ij over real words j, A = img words^T (leaky-ReLU(0.1) if ``leaky``).
    """
    A = img @ words.transpose(1, 2)  # (P, Ti, L)
    if leaky:
        A = F.leaky_relu(A, negative_slope=0.1)
    real = mask.bool().unsqueeze(1)
    i2t = A.masked_fill(~real, torch.finfo(A.dtype).min).amax(dim=2).mean(dim=1)
    t2i = (A.amax(dim=1) * mask.to(A.dtype)).sum(1) / mask.to(A.dtype).sum(1).clamp_min(1.0)
    return i2t + t2i


class LapsHead(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, dim: int, num_patches: int, rho: float, lam: float,
                 beta: float, official: bool, tau: float = 1.0) -> None:
        super().__init__()
        self.rho, self.lam, self.beta, self.official, self.tau = rho, lam, beta, official, tau
        self.num_aggr = math.floor(lam * rho * num_patches + 1e-9)
        if self.num_aggr < 1:
            raise ValueError(f"laps: N_c = floor(lam * rho * N) = floor({lam} * {rho} * {num_patches}) must be >= 1")
        self.image_proj = nn.Linear(image_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.score_net = None
        if not official:
            self.score_net = nn.Sequential(nn.Linear(dim, max(1, dim // 2)), nn.GELU(), nn.Linear(max(1, dim // 2), 1))
        hidden = max(1, int(dim * 0.2))
        self.aggr = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, self.num_aggr))

    def extra_repr(self) -> str:
        return f"rho={self.rho}, lam={self.lam}, beta={self.beta}, official={self.official}, N_c={self.num_aggr}"

    # -- LPS -------------------------------------------------------------------------------------------------
    def scores(self, v: Tensor, t: Tensor, t_mask: Tensor) -> Tensor:
        """Patch scores a (P, N) from patches v (P, N, E) and words t (P, L, E), mask (P, L)."""
        with torch.no_grad():
            vn = F.normalize(v.float(), dim=-1)
            v_glo = F.normalize(v.float().mean(1, keepdim=True), dim=-1)
            t_glo = F.normalize(masked_word_mean(t.float(), t_mask).unsqueeze(1), dim=-1)
            cos_s, cos_r = (vn * v_glo).sum(-1), (vn * t_glo).sum(-1)
        if self.official:
            return cos_s + cos_r
        a_p = torch.sigmoid(self.score_net(v).squeeze(-1)).float()
        return (1 - self.beta) * a_p + self.beta / 2 * (Fn.minmax_norm(cos_s) + Fn.minmax_norm(cos_r))

    # -- SPC -------------------------------------------------------------------------------------------------
    def slim(self, v_cls: Tensor, v: Tensor, a: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """Slimmed, L2-normalised tokens (P, 1 + N_c [+ 1], E) and the decision D (P, N) (1 = kept)."""
        P, N, E = v.shape
        if self.training and not self.official:
            log_a = torch.stack([a.clamp_min(1e-6).log(), (1 - a).clamp_min(1e-6).log()], dim=-1)
            D = Fn.st_keep_mask(log_a, generator, tau=self.tau)
            W = Fn.policy_softmax(self.aggr(v).transpose(1, 2), D.unsqueeze(1))  # (P, N_c, N)
            agg = W.to(v.dtype) @ v
            wf = Fn.policy_softmax(a, 1 - D)  # softmax(a) over the redundant tokens
            fused = (wf.to(v.dtype).unsqueeze(-1) * v).sum(1, keepdim=True)
            out = torch.cat([v_cls, agg, fused], dim=1)
        else:
            k = Fn.keep_count(self.rho, N)
            keep, drop = Fn.topk_keep(a.detach(), k)
            vs = Fn.gather_tokens(v, keep)
            W = self.aggr(vs).transpose(1, 2).float().softmax(dim=-1)  # (P, N_c, K)
            parts = [v_cls, W.to(v.dtype) @ vs]
            if drop.shape[1] > 0:
                wf = Fn.gather_tokens(a, drop).float().softmax(dim=-1)
                parts.append(Fn.fuse_tokens(Fn.gather_tokens(v, drop), wf, renorm=False))
            out = torch.cat(parts, dim=1)
            D = torch.zeros_like(a).scatter(1, keep, 1.0)
        return F.normalize(out, dim=-1), D

    # -- pairs -----------------------------------------------------------------------------------------------
    def pair_similarity(self, img: Tensor, words: Tensor, mask: Tensor, generator=None) -> Tuple[Tensor, Tensor]:
        """Projected image tokens (P, 1 + N, E) paired with projected words (P, L, E) -> S (P,), D (P, N)."""
        v_cls, v = img[:, :1], img[:, 1:]
        a = self.scores(v, words, mask)
        tokens, D = self.slim(v_cls, v, a, generator)
        return spa_similarity(tokens, F.normalize(words, dim=-1), mask, leaky=self.official), D

    def similarity(self, image_x: Tensor, text: Tensor, text_mask: Tensor, generator: Optional[torch.Generator] = None,
                   chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """All pairs: image states (Bi, 1 + N, Dv), text states (Bt, L, Dt), mask (Bt, L) -> S (Bi, Bt) and the
        decisions D (Bi, Bt, N). Captions are processed ``chunk`` at a time (default all) to bound memory."""
        if image_x.dim() != 3 or text.dim() != 3:
            raise ValueError(f"laps: image (Bi, T, D) and text (Bt, L, D) states expected, got {tuple(image_x.shape)}, {tuple(text.shape)}")
        empty = (text_mask.sum(1) == 0).nonzero().flatten()
        if len(empty):
            raise ValueError(f"laps: caption(s) at index {empty.tolist()} are fully padded")
        vi, tt = self.image_proj(image_x), self.text_proj(text)
        Bi, Bt = vi.shape[0], tt.shape[0]
        c = Bt if chunk is None else int(chunk)
        if c < 1:
            raise ValueError(f"laps: chunk must be >= 1, got {chunk}")
        sims, decisions = [], []
        for s in range(0, Bt, c):
            tc, mc = tt[s:s + c], text_mask[s:s + c]
            n = tc.shape[0]
            img = vi.unsqueeze(1).expand(Bi, n, *vi.shape[1:]).reshape(Bi * n, *vi.shape[1:])
            words = tc.unsqueeze(0).expand(Bi, *tc.shape).reshape(Bi * n, *tc.shape[1:])
            S, D = self.pair_similarity(img, words, mc.unsqueeze(0).expand(Bi, *mc.shape).reshape(Bi * n, -1), generator)
            sims.append(S.view(Bi, n))
            decisions.append(D.view(Bi, n, -1))
        return torch.cat(sims, dim=1), torch.cat(decisions, dim=1)


def laps_similarity(model: nn.Module, image: Union[TokenState, Tensor], text: Tensor, text_mask: Tensor,
                    generator: Optional[torch.Generator] = None, chunk: Optional[int] = None,
                    return_decisions: bool = False):
    """Image-text similarity matrix (Bi, Bt) of LAPS for images x captions.

    image: the ViT output of the images (``model.encode_image(images)``, unguided) or its ``x`` (Bi, 1 + N, Dv);
    text: ``model.encode_text(ids, mask)`` (Bt, L, Dt); text_mask (Bt, L). With ``return_decisions`` also the
    patch decisions (Bi, Bt, N) that the ratio loss needs.
    """
    head = getattr(model, "laps", None)
    if head is None:
        raise ValueError("this model has no LAPS head; build it with method='laps'")
    x = image.x if isinstance(image, TokenState) else image
    S, D = head.similarity(x, text, text_mask, generator, chunk)
    return (S, D) if return_decisions else S


@register("laps", placement="after encoders", keep=DEFAULT_KEEP, options=OPTIONS, text_guided=True, learned=True,
          scores_pairs=True, owns=("laps",), title="LAPS")
def build(cfg: ReduceConfig, model, opts: dict) -> None:
    if cfg.layers is not None:
        raise ValueError(f"laps works after both encoders and takes no layers, got {list(cfg.layers)}")
    if "vision" not in model.reduction_slots():
        raise ValueError("laps needs a two-stream (ALBEF-style) model with separate image and text encoders")
    if isinstance(cfg.keep, tuple):
        raise ValueError(f"laps takes one keep rate rho, got {list(cfg.keep)}")
    rho = Fn.check_keep(DEFAULT_KEEP if cfg.keep is None else cfg.keep, "laps: keep")
    beta, lam = opts["beta"], opts["lam"]
    c = model.cfg
    dim = c.embed_dim if opts["dim"] is None else opts["dim"]
    head = LapsHead(c.vision.width, c.text.width, dim, c.vision.num_patches, rho, float(lam), float(beta),
                    bool(opts["official"]), float(opts["tau"]))
    p = next(model.parameters())
    model.laps = head.to(device=p.device, dtype=p.dtype).train(model.training)


__all__ = ["LapsHead", "laps_similarity", "spa_similarity", "build"]
