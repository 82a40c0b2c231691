"""Pre-training (ALBEF): ITC with momentum distillation and queues + ITM with hard negatives + MLM.

Text-guided methods (TRIPS, ELIP, ...) make an image's tokens depend on a caption. Pre-training encodes each
image once, guided by its *own* paired caption (ALBEF + TRIPS): that image [CLS] gives the ITC feature, and the
same image tokens serve the ITM positive, the ITM hard negatives (image i's tokens with caption j, and for each
caption a negative image's tokens) and MLM (the masked caption cross-attends to them). The momentum encoders
(teachers for ITC / MLM distillation and the queue features) stay unpruned.

``alpha`` (momentum distillation weight) ramps linearly from 0 over the learning-rate warm-up, as ALBEF ramps it
over its first epoch. The ITC temperature is clamped to [0.001, 0.5] before each step, as in ALBEF.

ITM negatives: the share drawn from the ITC similarities (the rest uniformly, ``objectives.itm``) ramps linearly
from 0 to 1 over the first ``hard_ramp`` fraction of the steps (default 1.0: the share is the fraction of training
done). ALBEF draws all negatives hard from the start (``hard_ramp=0``), which suits a model that starts from
pre-trained encoders; from random weights it keeps ITM at the class prior (measured; see ``objectives/itm.py``).

Loss weights default to ALBEF's (1, 1, 1). From random weights on the scenes data, MLM at weight 1 dominates the
first few hundred steps (its loss starts near ln(vocab) while ITC sits on a plateau) and delays ITC and ITM;
README's from-scratch commands use ``mlm=0.3`` (measured there).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.datasets import CaptionDataset
from ..data.formats import load_annotations
from ..objectives.itc import itc
from ..objectives.itm import itm_loss, sample_negatives
from ..objectives.mlm import mask_tokens, mlm_loss
from .base import StepContext, Task, register_task


@register_task("pretrain")
class PretrainTask(Task):
    name = "pretrain"
    scenes_file = "pretrain.json"

    def __init__(self, itc: float = 1.0, itm: float = 1.0, mlm: float = 1.0, alpha: float = 0.4,
                 mlm_prob: float = 0.15, mlm_distill: bool = True, hard_ramp: float = 1.0):
        for name, w in (("itc", itc), ("itm", itm), ("mlm", mlm)):
            if not (isinstance(w, (int, float)) and w >= 0):
                raise ValueError(f"loss weight {name} must be a number >= 0, got {w!r}")
        if itc + itm + mlm <= 0:
            raise ValueError("at least one of the itc / itm / mlm loss weights must be > 0")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= hard_ramp <= 1.0:
            raise ValueError(f"hard_ramp (share of the steps over which ITM negatives turn hard) must be in [0, 1], "
                             f"got {hard_ramp}")
        self.hard_ramp = float(hard_ramp)
        self.w = {"itc": float(itc), "itm": float(itm), "mlm": float(mlm)}
        self.alpha, self.mlm_prob, self.mlm_distill = float(alpha), float(mlm_prob), bool(mlm_distill)

    def check_model(self, model) -> None:
        if model.cfg.arch != "albef":
            raise ValueError(f"the pretrain task trains two-stream models (arch='albef'), got arch={model.cfg.arch!r}")

    def load(self, path) -> List[Dict[str, Any]]:
        """Pre-training pairs; a retrieval-train file (which has the same fields plus image_id) works too."""
        return load_annotations(path, "pretrain")

    def texts(self, entries) -> Iterable[str]:
        return [e["caption"] for e in entries]

    def build_dataset(self, entries, loader, skip_bad_images: bool = False) -> CaptionDataset:
        return CaptionDataset(entries, loader, skip_bad_images)

    def alpha_at(self, ctx: StepContext) -> float:
        if ctx.warmup_steps <= 0:
            return self.alpha
        return self.alpha * min(1.0, ctx.step / ctx.warmup_steps)

    def hard_at(self, ctx: StepContext) -> float:
        """Share of ITM negatives drawn from the ITC similarities at this step (the rest uniformly)."""
        ramp = self.hard_ramp * ctx.total_steps
        return 1.0 if ramp <= 0 else min(1.0, ctx.step / ramp)

    def step(self, model, batch: Dict[str, Any], ctx: StepContext, update: bool = True) -> Dict[str, Tensor]:
        images, ids, mask, idx = batch["images"], batch["ids"], batch["mask"], batch["image_id"]
        g = ctx.generator
        if update:
            with torch.no_grad():
                model.temp.clamp_(0.001, 0.5)
        text = model.encode_text(ids, mask)
        image = model.encode_image(images, text, mask, g)  # guided by its own caption
        img, txt = model.image_embed(image), model.text_embed(text)
        me = model.momentum_encoders
        img_m = txt_m = image_m = None
        if me is not None:
            with torch.no_grad():
                if update:
                    model.momentum_update()
                image_m = me["vision"](images)
                img_m = F.normalize(me["vision_proj"](image_m.x[:, 0]), dim=-1)
                txt_m = F.normalize(me["text_proj"](me["text"](ids, mask)[:, 0]), dim=-1)
        alpha = self.alpha_at(ctx)
        out: Dict[str, Tensor] = {}
        r = itc(model, img, txt, idx, alpha, img_m, txt_m, update_queue=update)
        total = self.w["itc"] * r.loss
        out["itc"] = r.loss.detach()
        with torch.no_grad():  # in-batch image->text top-1 (a caption of the same image counts): chance ~ 1/B
            hit = idx[r.sim_i2t.argmax(1)] == idx
            out["itc_acc"] = hit.float().mean()
        if self.w["itm"] > 0:
            neg_txt, neg_img = sample_negatives(r.sim_i2t, r.sim_t2i, g, idx, self.hard_at(ctx))
            loss, acc = itm_loss(model, image, text, mask, neg_txt, neg_img, g)
            total = total + self.w["itm"] * loss
            out["itm"], out["itm_acc"] = loss.detach(), acc
        if self.w["mlm"] > 0:
            tok = ctx.tokenizer
            masked, labels = mask_tokens(ids, mask, model.cfg.text.vocab_size, tok.mask_id, tok.special_ids, g,
                                         self.mlm_prob)
            fused, _ = model.fuse(model.encode_text(masked, mask), mask, image, g)
            logits = model.mlm_head(fused)
            teacher = None
            a = alpha if (self.mlm_distill and me is not None) else 0.0
            if a > 0:
                with torch.no_grad():
                    fused_m, _ = me["fusion"](me["text"](masked, mask), mask, image_m)
                    teacher = model.mlm_head(fused_m)
            loss = mlm_loss(logits, labels, a, teacher)
            total = total + self.w["mlm"] * loss
            out["mlm"] = loss.detach()
        out["loss"] = total
        return out

