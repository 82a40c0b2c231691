"""Training objectives: ITC (momentum distillation, queues), ITM (hard negatives), MLM, KL distillation; the
method-specific losses (DynamicViT, TiP, LAPS) live in their own modules (pure loss functions)."""

from .distill import kl_distill
from .itc import enqueue, itc, itc_loss
from .itm import itm_loss, sample_negatives
from .mlm import mask_tokens, mlm_loss

__all__ = ["kl_distill", "enqueue", "itc", "itc_loss", "itm_loss", "sample_negatives", "mask_tokens", "mlm_loss"]
