"""Loading a Hugging Face model for the CLI (``--hf DIR_OR_ID``): the class its config names, and a patch saved
beside it (``vlprune_patch.json``) re-applied."""

from __future__ import annotations

import os

from torch import nn

from .core import CONFIG_FILE, load_patch


def load_hf(path_or_id: str, flag: str = "--hf") -> nn.Module:
    """A saved transformers model (a local directory, or a hub id when online) in eval mode, by the class its config
    names (``architectures``); a patched model's ``vlprune_patch.json`` beside it is read too."""
    import transformers

    try:
        cfg = transformers.AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{flag} {path_or_id}: no transformers model found there ({e})") from None
    archs = getattr(cfg, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        raise ValueError(f"{flag} {path_or_id}: its config names no transformers model class (architectures={archs})")
    try:
        model = cls.from_pretrained(path_or_id).eval()
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:  # truncated / corrupt weight files among them
        raise ValueError(f"{flag} {path_or_id}: cannot load its {cls.__name__} weights: the weight file is missing, "
                         f"truncated or corrupt ({type(e).__name__}: {str(e)[:300]})") from None
    except Exception as e:  # safetensors' SafetensorError is not an OSError
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{flag} {path_or_id}: cannot read its weights: a .safetensors file is truncated or corrupt "
                         f"({e})") from None
    if os.path.isfile(os.path.join(str(path_or_id), CONFIG_FILE)):
        load_patch(model, path_or_id)
    return model


__all__ = ["load_hf"]
