"""Training objectives (pure loss functions): ITC (momentum distillation, queues), ITM (hard negatives), MLM,
KL distillation; TiP's, LAPS's and DynamicViT's losses live in their own modules; the learned methods' losses are looked up by
method name in ``method_losses.LOSSES``."""

from .distill import kl_distill
from .itc import enqueue, itc, itc_loss
from .itm import itm_loss, sample_negatives
from .mlm import mask_tokens, mlm_loss
from .method_losses import LOSSES, MethodLossInputs, method_loss, register_loss

# the learned methods' losses, each registering itself on import (a new learned method adds its module here)
from . import dynamicvit, tip  # noqa: E402,F401,I001

__all__ = ["kl_distill", "enqueue", "itc", "itc_loss", "itm_loss", "sample_negatives", "mask_tokens", "mlm_loss",
           "LOSSES", "MethodLossInputs", "method_loss", "register_loss"]
