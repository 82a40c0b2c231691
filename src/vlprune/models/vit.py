"""Vision Transformer image encoder: pre-norm layers, a [CLS] token, learned position embeddings
(interpolable to other image sizes) and a reduction slot in every layer.

Each layer computes ``x = x + attn(ln1(x)); state = reduce(state); x = x + mlp(ln2(x))`` (``docs/methods.md``). With the
slot empty it is an ordinary ViT layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VisionConfig
from ..reduce.slots import SlotInput
from ..reduce.state import ReduceContext, TokenState
from .attention import Attention, Mlp
from .base import run_block


class ViTLayer(nn.Module):
    """One pre-norm transformer layer with a reduction slot (``self.reducer``, None when empty)."""

    grad_checkpointing = False  # models.base.set_grad_checkpointing

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float, qkv_bias: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, bias=qkv_bias)
        self.ln2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim, act)
        self.reducer: Optional[nn.Module] = None

    def forward(self, state: TokenState, ctx: ReduceContext) -> TokenState:
        r = self.reducer
        if r is not None and r.where == "pre":
            state = r(state, SlotInput.pre_norm("vision", self), ctx)
        x = state.x
        a, q, k = self.attn(self.ln1(x), bias=state.attn_bias(x.dtype))
        state = state.replace(x=x + a)
        if r is not None and r.where == "mid":
            state = r(state, SlotInput.pre_norm("vision", self, q, k), ctx)
        x = state.x
        return state.replace(x=x + self.mlp(self.ln2(x)))

    def plain(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """The layer without its reducer on plain tokens x (B, T, D) (look-ahead passes such as ELIP's)."""
        a, _, _ = self.attn(self.ln1(x), bias=bias)
        x = x + a
        return x + self.mlp(self.ln2(x))

    def cls_query_and_keys(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """This layer's [CLS] query (B, H, 1, d) and keys (B, H, T, d) of tokens x (B, T, D), without the rest of
        its attention."""
        n = self.ln1(x)
        return self.attn.project_query(n[:, :1]), self.attn.project_key(n)


def interpolate_pos_embed(pos: Tensor, grid: int) -> Tensor:
    """Resize position embeddings (1, 1 + g*g, D) to (1, 1 + grid*grid, D) (bicubic, [CLS] row unchanged)."""
    n = pos.shape[1] - 1
    old = int(round(math.sqrt(n)))
    if old * old != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    if old == grid:
        return pos
    cls, patches = pos[:, :1], pos[:, 1:]
    D = pos.shape[-1]
    patches = patches.reshape(1, old, old, D).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(pos.dtype)
    return torch.cat([cls, patches], dim=1)


def sincos_pos_embed(grid: int, width: int) -> Tensor:
    """2-D sine-cosine position embeddings (1, 1 + grid*grid, width), MAE's layout: the first half of the channels
    encodes the row, the second the column, each as sin / cos of the index at ``width / 4`` frequencies from 1 down
    to 1/10000; the [CLS] row is zero. Rows are in raster order (patch ``r * grid + c``)."""
    if width % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, got {width}")
    q = width // 4
    freq = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    idx = torch.arange(grid, dtype=torch.float64)
    ang = idx[:, None] * freq[None]  # (grid, q)
    one = torch.cat([ang.sin(), ang.cos()], dim=1)  # (grid, width / 2)
    rows = one[:, None, :].expand(grid, grid, -1)
    cols = one[None, :, :].expand(grid, grid, -1)
    pe = torch.cat([rows, cols], dim=-1).reshape(grid * grid, width)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), pe], dim=0)[None].float()


class ImageEmbeddings(nn.Module):
    """Patch embedding + [CLS] + position embeddings (+ CLIP's pre-norm): images -> (B, 1 + N, D)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.patch_embed = nn.Conv2d(cfg.channels, D, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, D))
        self.pre_norm = nn.LayerNorm(D, eps=cfg.ln_eps) if cfg.pre_norm else nn.Identity()
        if cfg.pos_init == "sincos":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed(cfg.grid, D))
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        # A method working on the input (lowres) sets this: images are resized to input_size x input_size before the patch embedding
        # (position embeddings interpolated). None = as given. Reset when the method is removed.
        self.input_size: Optional[int] = None

    def check_images(self, images: Tensor, interpolate_pos: bool = False) -> None:
        """Raise ValueError/TypeError naming what is wrong with an image batch."""
        cfg = self.cfg
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, {cfg.channels}, H, W), got rank {images.dim()}")
        B, C, H, W = images.shape
        if B == 0:
            raise ValueError("image batch is empty (batch size 0)")
        if C != cfg.channels:
            raise ValueError(f"images must have {cfg.channels} channels, got {C}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor, got {images.dtype}")
        if interpolate_pos:
            if H != W or H % cfg.patch_size:
                raise ValueError(f"image size {H}x{W} must be square and divisible by patch {cfg.patch_size}")
        elif (H, W) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images must be {cfg.image_size}x{cfg.image_size}, got {H}x{W} "
                "(pass interpolate_pos=True to run at another size)"
            )

    def forward(self, images: Tensor, interpolate_pos: bool = False) -> Tensor:
        self.check_images(images, interpolate_pos)
        if self.input_size is not None and images.shape[-1] != self.input_size:
            s = self.input_size
            images = F.interpolate(images.float(), size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1] - 1:
            pos = interpolate_pos_embed(pos, int(round(math.sqrt(x.shape[1]))))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.pre_norm(torch.cat([cls, x], dim=1) + pos)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.embeddings = ImageEmbeddings(cfg)
        self.layers = nn.ModuleList(
            ViTLayer(D, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps, cfg.qkv_bias) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.apply(_init_weights)

    def embed(self, images: Tensor, interpolate_pos: bool = False) -> Tensor:
        """images (B, C, H, W) -> tokens (B, 1 + N, D) with [CLS] and position embeddings added."""
        return self.embeddings(images, interpolate_pos)

    def forward(
        self,
        images: Tensor,
        ctx: Optional[ReduceContext] = None,
        trace: bool = False,
        interpolate_pos: bool = False,
        final_norm: bool = True,
    ) -> TokenState:
        """images (B, C, H, W) -> TokenState with x (B, T, D) after the final LayerNorm (unless final_norm=False)."""
        ctx = ctx or ReduceContext()
        state = TokenState.start(self.embed(images, interpolate_pos), trace=trace)
        ctx = dataclasses.replace(ctx, num_patches=state.num_tokens - 1)
        for i, layer in enumerate(self.layers):
            state = run_block(layer, state, ctx.at(i, self))
        if final_norm:
            state = state.replace(x=self.norm(state.x))
        return state


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
