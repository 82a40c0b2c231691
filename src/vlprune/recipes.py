"""Training defaults per model preset: what ``vlprune train`` uses when ``--lr`` / ``--loss`` are not given.

The from-scratch presets (``tiny``, ``small``) need other settings than a model that starts from pre-trained
weights (``albef-base``, ``vilt-base``: ALBEF's own). Each number below was measured on the built-in scenes data
(README: "How this recipe was found" for pre-training, "How the VQA recipe was found" for the downstream tasks):

- pre-training ``small`` from scratch: lr 3e-4, MLM at weight 0.3 (ITC, ITM and MLM all fall; at lr 1e-3 or MLM
  weight 1 ITC and ITM stayed at chance for 600 steps);
- a downstream task from scratch (no ``--init``) on a from-scratch preset: lr 1e-3 (3e-4 and 2e-3 learned less in
  the same steps);
- a downstream task from a checkpoint (``--init``): lr 2e-4, the demo's second stage;
- a downstream task from an official checkpoint (``--init-official``): the official fine-tuning rates, 1e-5 for
  retrieval and 2e-5 for VQA, NLVR2 and SNLI-VE (ALBEF's configs; 2e-4 would wreck a base-size pre-trained model);
- anything else: ALBEF's 1e-4 and its loss weights (1, 1, 1).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

FROM_SCRATCH = ("tiny", "small")
GENERIC_LR = 1e-4


OFFICIAL_LR = {"pretrain": GENERIC_LR, "retrieval": 1e-5}


def default_lr(task: str, model: Optional[str], init: Optional[str], official: bool = False) -> float:
    """The learning rate ``vlprune train TASK`` uses without ``--lr``. ``model``: the preset name or config
    file (None = the default preset, ``small``); ``init``: the checkpoint a fine-tuning run starts from;
    ``official``: that checkpoint was converted from an official release (``--init-official``)."""
    if official:
        return OFFICIAL_LR.get(task, 2e-5)
    if init is not None:
        return GENERIC_LR if task == "pretrain" else 2e-4
    if (model or "small") not in FROM_SCRATCH:
        return GENERIC_LR
    return 3e-4 if task == "pretrain" else 1e-3


def default_task_options(task: str, model: Optional[str], init: Optional[str]) -> Dict[str, Any]:
    """Task options (loss weights) used unless ``--loss`` sets them: MLM at 0.3 when pre-training a from-scratch
    preset, else the task's own defaults."""
    if task == "pretrain" and init is None and (model or "small") in FROM_SCRATCH:
        return {"mlm": 0.3}
    return {}
