"""Building models, attaching methods, and our own save/load (safetensors + config JSON)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union


from torch import Tensor, nn

from ..fileio import atomic_write, read_json
from ..config import ModelConfig, from_dict, load_preset, override, to_dict
from ..reduce.registry import ReduceConfig, as_reduce_config, install, owned_prefixes
from .albef import ALBEF
from .vilt import ViLT
from .vit import interpolate_pos_embed

log = logging.getLogger(__name__)

MethodLike = Union[None, str, ReduceConfig, Mapping[str, Any]]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def build_model(model: Union[str, Path, ModelConfig] = "tiny", method: MethodLike = None, **overrides: Any) -> nn.Module:
    """Build a model from a preset name, a JSON file or a ``ModelConfig``, with random weights.

    ``method``: None / "none" (no reduction), a method name with its defaults (``"trips"``), or a
    ``ReduceConfig`` (``ReduceConfig("trips", layers=(5, 10), keep=0.7)``; layer numbers 1-based).
    ``overrides``: config fields, dotted for nested ones (``**{"vision.image_size": 64}``) or as mappings
    (``vision={"layers": 6}``).
    """
    cfg = model if isinstance(model, ModelConfig) else load_preset(model)
    if overrides:
        cfg = override(cfg, **overrides)
    net = ALBEF(cfg) if cfg.arch == "albef" else ViLT(cfg)
    attach(net, method)
    return net


def attach(model: nn.Module, method: MethodLike) -> nn.Module:
    """Install ``method`` in ``model``'s reduction slots (replacing any installed method); returns the model."""
    rc = as_reduce_config(method)
    model.clear_reducers()
    if rc is not None:
        install(rc, model)  # "none" too, so that its config is checked (it takes no layers, keep or options)
    if rc is not None and rc.name != "none":
        model.method_config = rc
        # reducers follow the model's device and dtype
        p = next(model.parameters())
        for r in model.reducers().values():
            r.to(device=p.device, dtype=p.dtype)
            r.train(model.training)  # a reducer attached to a model in eval mode runs its inference path
    return model


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def save_pretrained(model: nn.Module, directory: Union[str, Path], extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``config.json`` (model config + method) and ``model.safetensors`` to ``directory``, atomically."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rc = getattr(model, "method_config", None)
    from .heads import head_record

    heads = {name: head_record(h) for name, h in model.task_heads.items()}
    meta = {"model": to_dict(model.cfg), "method": None if rc is None else rc.to_dict(), "heads": heads,
            **(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write_bytes(d / WEIGHTS_NAME, save(tensors))
    _atomic_write_bytes(d / CONFIG_NAME, json.dumps(meta, indent=2).encode())
    return d


def read_config(directory: Union[str, Path]) -> Dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory} (not a vlprune checkpoint directory)")
    meta = read_json(path, CONFIG_NAME)
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(f"{path} has no 'model' section")
    return meta


def load_pretrained(
    directory: Union[str, Path], method: Union[MethodLike, str] = "saved", map_location: str = "cpu", **overrides: Any
) -> nn.Module:
    """Load a model written by ``save_pretrained``; loading is strict.

    ``method="saved"`` (default) installs the method the checkpoint was saved with; any other value installs that
    method instead (e.g. apply EViT at inference to a model trained without reduction): the saved method's own
    parameters are then dropped, and a learned method whose parameters the checkpoint lacks raises.
    ``overrides`` change the config; a changed ``vision.image_size`` interpolates the position embeddings.
    Missing or unexpected keys and shape mismatches raise ``ValueError`` naming them.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    meta = read_config(d)
    cfg = from_dict(ModelConfig, meta["model"], f"{d / CONFIG_NAME}:model")
    if overrides:
        cfg = override(cfg, **overrides)
    saved = meta.get("method")
    switched = method != "saved"
    chosen = (None if saved is None else ReduceConfig.from_dict(saved)) if not switched else method
    model = build_model(cfg, chosen)
    if meta.get("heads"):
        from .heads import add_recorded_head

        for task, record in meta["heads"].items():
            add_recorded_head(model, task, record)
    wpath = d / WEIGHTS_NAME
    if not wpath.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {d}")
    try:
        state = load_file(str(wpath), device=map_location)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"cannot read weights {wpath}: {e}") from None
    if switched:
        dropped = [k for k in state if ".reducer." in k or k.startswith(owned_prefixes())]
        for k in dropped:
            del state[k]
        if dropped:
            log.info("dropped %d parameters of the saved method %s", len(dropped), (saved or {}).get("name"))
    load_state_strict(model, state, str(wpath))
    return model


def load_state_strict(model: nn.Module, state: Dict[str, Tensor], where: str) -> None:
    """``load_state_dict`` that interpolates position embeddings to the model's grid and otherwise names every
    missing key, unexpected key and shape mismatch in one ValueError."""
    own = model.state_dict()
    for k, v in list(state.items()):
        if k.endswith("pos_embed") and k in own and v.shape != own[k].shape and v.shape[-1] == own[k].shape[-1]:
            grid = int(round((own[k].shape[1] - 1) ** 0.5))
            state[k] = interpolate_pos_embed(v, grid)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_short(mismatched)}")
        raise ValueError(f"checkpoint {where} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


# -- the saved-model layout -----------------------------------------------------------------------------------
# Checkpoints are given as a run directory (``RUN/model/config.json``, ``RUN/tokenizer/``) or as a ``save_pretrained``
# directory (``config.json`` + ``model.safetensors``; its tokenizer is found through the config's ``"tokenizer"``
# entry, a ``tokenizer/`` folder inside it, or one beside it).

def _new_part(key: str) -> bool:
    """Parameters a fine-tuning run may add to (or drop from) a pre-trained checkpoint."""
    return ".reducer." in key or key.startswith(owned_prefixes() + ("task_heads.",))


def checkpoint_dir(path: Union[str, Path]) -> Path:
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


def tokenizer_dir(path: Union[str, Path]) -> Optional[Path]:
    """The tokenizer that belongs to a checkpoint, or None."""
    ckpt = checkpoint_dir(path)
    meta = read_config(ckpt)
    cands = ([ckpt / meta["tokenizer"]] if meta.get("tokenizer") else []) + [ckpt / "tokenizer", ckpt.parent / "tokenizer"]
    for c in cands:
        if (c / "tokenizer.json").is_file() or (c / "vocab.txt").is_file():
            return c.resolve()
    return None


def model_config(path: Union[str, Path]) -> ModelConfig:
    ckpt = checkpoint_dir(path)
    return from_dict(ModelConfig, read_config(ckpt)["model"], str(ckpt / CONFIG_NAME))


def load_init(model: nn.Module, path: Union[str, Path]) -> List[str]:
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


def _short(items, n: int = 8) -> str:
    return str(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
