"""vlprune's reduction methods inside off-the-shelf Hugging Face models, in one call.

    import vlprune
    model = BlipForQuestionAnswering.from_pretrained("Salesforce/blip-vqa-base")
    vlprune.patch(model, "trips", keep=0.5)      # in place; the model's own forward / generate keep working
    out = model.generate(**inputs)
    vlprune.unpatch(model)                       # exactly the original model again

``vlprune.patch`` is this package and can be called as the function ``patch`` (the module is callable), so both
``vlprune.patch(model, ...)`` and ``vlprune.patch.unpatch(model)`` / ``vlprune.patch.guidance(...)`` work.
Supported classes and methods: ``supported_classes()`` and docs/patch.md.
"""

import sys
import types

from .base import FAMILIES, Offer, register_family
from .core import get_patch, guidance, load_patch, patch, supported_classes, unpatch

# the Hugging Face families, each registering itself on import, in the order ``patch`` tries them; a new family is
# one module here (and a tiny test config in tests/hf_tiny.py)
from . import blip, clip, vilt, bridgetower, llava, llava_next, qwen2_vl  # noqa: E402,F401,I001


class _CallableModule(types.ModuleType):
    """Lets ``vlprune.patch(model, method, ...)`` call ``patch`` while ``vlprune.patch`` stays this package."""

    def __call__(self, *args, **kwargs):
        return patch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["patch", "unpatch", "get_patch", "guidance", "load_patch", "supported_classes", "FAMILIES", "Offer",
           "register_family"]
