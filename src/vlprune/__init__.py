"""vlprune: text-guided image-token reduction for vision-language transformers.

    import vlprune
    model = vlprune.build_model("tiny", method=vlprune.ReduceConfig("trips", layers=(2, 3), keep=0.7))
    vlprune.list_methods()
"""

import logging

from .config import ModelConfig, TextConfig, VisionConfig, list_presets, load_preset
from .models import attach, build_model, from_hf, load_official, load_pretrained, save_pretrained
from .reduce import ReduceConfig, TokenState, list_methods
from . import patch  # noqa: E402  (callable: vlprune.patch(model, method, ...))
from .patch import unpatch
from .version import __version__


logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ModelConfig", "VisionConfig", "TextConfig", "ReduceConfig", "TokenState", "build_model", "attach",
    "from_hf", "load_official", "patch", "unpatch", "save_pretrained", "load_pretrained", "list_methods", "list_presets",
    "load_preset",
    "__version__",
]
