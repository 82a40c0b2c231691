"""Training objectives (pure loss functions): ITC (momentum distillation, queues), ITM (hard negatives), MLM,
KL distillation; TiP's, LAPS's and DynamicViT's losses live in their own modules."""

from .distill import kl_distill
from .itc import enqueue, itc, itc_loss
from .itm import itm_loss, sample_negatives
from .mlm import mask_tokens, mlm_loss

__all__ = ["kl_distill", "enqueue", "itc", "itc_loss", "itm_loss", "sample_negatives", "mask_tokens", "mlm_loss"]
