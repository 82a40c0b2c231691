"""What the fine-tuning tasks share: starting from a pre-trained run (``--init``), the teacher of TiP's and
DynamicViT's distillation (``--teacher``), TiP's two training stages, and the losses of the learned methods.

Checkpoints are given as a run directory (``RUN/model/config.json``, ``RUN/tokenizer/``) or as a
``save_pretrained`` directory (``config.json`` + ``model.safetensors``; its tokenizer is found through the
config's ``"tokenizer"`` entry, a ``tokenizer/`` folder inside it, or one beside it).

TiP's stages (the TiP paper): stage 1 freezes the backbone and trains the pruners and the task head with lam = 0
(no continuity loss); stage 2 also trains the cross-modal layers (ViLT: the joint encoder, its final norm and
pooler; ALBEF: the fusion encoder) with lam = 1. Without a stage everything trains with lam = 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..config import ModelConfig, from_dict
from ..models.build import CONFIG_NAME, WEIGHTS_NAME, load_pretrained, load_state_strict, read_config
from ..objectives.method_losses import MethodLossInputs, method_loss
from ..reduce.registry import get_spec, installed_spec, list_methods, owned_prefixes

log = logging.getLogger(__name__)
PathLike = Union[str, Path]


def _new_part(key: str) -> bool:
    """Parameters a fine-tuning run may add to (or drop from) a pre-trained checkpoint."""
    return ".reducer." in key or key.startswith(owned_prefixes() + ("task_heads.",))


def checkpoint_dir(path: PathLike) -> Path:
    """The ``save_pretrained`` directory of a run directory or of itself."""
    p = Path(path)
    if (p / "model" / CONFIG_NAME).is_file():
        return p / "model"
    if (p / CONFIG_NAME).is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    raise FileNotFoundError(f"{p} is neither a vlprune run directory (with model/{CONFIG_NAME}) nor a saved model "
                            f"directory (with {CONFIG_NAME})")


def tokenizer_dir(path: PathLike) -> Optional[Path]:
    """The tokenizer that belongs to a checkpoint, or None."""
    ckpt = checkpoint_dir(path)
    meta = read_config(ckpt)
    cands = ([ckpt / meta["tokenizer"]] if meta.get("tokenizer") else []) + [ckpt / "tokenizer", ckpt.parent / "tokenizer"]
    for c in cands:
        if (c / "tokenizer.json").is_file() or (c / "vocab.txt").is_file():
            return c.resolve()
    return None


def model_config(path: PathLike) -> ModelConfig:
    ckpt = checkpoint_dir(path)
    return from_dict(ModelConfig, read_config(ckpt)["model"], str(ckpt / CONFIG_NAME))


def load_init(model: nn.Module, path: PathLike) -> List[str]:
    """Copy a pre-trained checkpoint's weights into ``model`` (built with this run's method and task heads).

    Reducers, the LAPS head and task heads that the checkpoint lacks keep their fresh initialisation; those the
    checkpoint has but the model does not (another method's, another task's) are skipped; a task head of another
    size (another answer vocabulary) is re-initialised. Anything else missing, unexpected or of another shape
    raises. Returns the keys that kept their fresh values."""
    from safetensors.torch import load_file

    ckpt = checkpoint_dir(path)
    state = load_file(str(ckpt / WEIGHTS_NAME))
    own = model.state_dict()
    for k in [k for k in state if k not in own and _new_part(k)]:
        del state[k]
    fresh = [k for k in own if _new_part(k) and (k not in state or state[k].shape != own[k].shape)]
    for k in fresh:
        state[k] = own[k]
    load_state_strict(model, state, str(ckpt / WEIGHTS_NAME))
    if fresh:
        log.info("init %s: %d new parameters keep their initialisation (%s ...)", ckpt, len(fresh), fresh[0])
    return fresh


def load_teacher(path: PathLike, device: torch.device) -> nn.Module:
    """The distillation teacher: the same task fine-tuned without pruning, frozen, in eval mode."""
    teacher = load_pretrained(checkpoint_dir(path), method=None).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def set_stage(model: nn.Module, stage: Optional[int]) -> None:
    """Freeze for TiP's stage 1 (reducers + task heads train) or stage 2 (also the cross-modal layers)."""
    if stage is None:
        return
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    spec = installed_spec(model)
    if spec is None or not spec.stages:
        staged = [n for n in list_methods() if get_spec(n).stages]
        raise ValueError(f"training stages need a learned method ({', '.join(staged)}), got {spec.name if spec else 'none'}")
    for p in model.parameters():
        p.requires_grad_(False)
    train: List[nn.Module] = list(model.reducers().values()) + [model.task_heads]
    if stage == 2:
        train += model.cross_modal_modules()
    for m in train:
        for name, p in m.named_parameters():
            p.requires_grad_(True)


def learned_methods() -> List[str]:
    """The registered methods that add losses to the fine-tuning tasks (``losses`` in their declaration)."""
    return [n for n in list_methods() if get_spec(n).losses]


def learned_method(model: nn.Module) -> Optional[str]:
    """The name of the installed method when it adds losses to the fine-tuning tasks, else None."""
    spec = installed_spec(model)
    return spec.name if spec is not None and spec.losses else None


def method_losses(
    model: nn.Module, task_loss: Tensor, aux: Sequence, logits: Tensor, teacher_logits: Optional[Tensor],
    student_tokens: Optional[Tensor] = None, teacher_tokens: Optional[Tensor] = None, lam: float = 1.0,
    weights: Optional[Dict[str, float]] = None,
) -> Dict[str, Tensor]:
    """{"loss": total, parts...} of a training pass: the task loss plus the installed learned method's losses
    (``objectives.method_losses``, from the AuxRecords ``aux`` of the pass); just the task loss for other methods.
    ``weights`` use the common names of ``objectives.method_losses`` (distill, sparsity, contrast, continuity, ratio,
    token_distill)."""
    name = learned_method(model) if model.training else None
    if name is None:
        return {"loss": task_loss}
    res = method_loss(name, MethodLossInputs(model, task_loss, aux, logits, teacher_logits, student_tokens,
                                             teacher_tokens, lam, dict(weights or {})))
    out: Dict[str, Any] = {"loss": res["total"]}
    out.update({k: v.detach() for k, v in res.items() if k not in ("total", "task")})
    return out
