"""Captioning with a Hugging Face ``BlipForConditionalGeneration`` (``vlprune eval caption --hf DIR_OR_ID``),
optionally patched by ``vlprune.patch`` (image-only methods: captioning has no text before the image).

BLIP's evaluation recipe: the prompt "a picture of " is fed to ``generate`` through the model's own processor,
beam search with 3 beams, max_length 20, min_length 5 (counting the prompt's tokens), repetition penalty 1.0; the
decoded text (special tokens skipped) loses its first ``len(prompt)`` characters. Reported per run: the caption
metrics (``tasks.caption_metrics``), generation seconds per image, the image tokens each decoding step
cross-attends to (after the patched encoder) and the new tokens generated per image.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from ..data.images import open_image
from ..patch import get_patch

CLASSES = ("BlipForConditionalGeneration",)


def generate_hf_captions(model: nn.Module, processor: Any, images: List[Any], prompt: str = "a picture of ",
                         num_beams: int = 3, max_length: int = 20, min_length: int = 5,
                         repetition_penalty: float = 1.0) -> List[str]:
    """Captions (the prompt removed) of PIL images, BLIP's way."""
    dev = next(model.parameters()).device
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**inputs, num_beams=num_beams, max_length=max_length, min_length=min_length,
                             repetition_penalty=repetition_penalty)
    texts = processor.batch_decode(out, skip_special_tokens=True)
    return [t[len(prompt):].strip() if t.startswith(prompt.strip()) else t.strip() for t in texts]


def evaluate_hf_caption(model: nn.Module, processor: Any, entries: Sequence[Dict[str, Any]], image_root: Path,
                        batch_size: int = 16, progress: bool = False, **gen: Any) -> Dict[str, Any]:
    """{"results": [{"image_id", "caption"}], "seconds_per_image", "image_tokens", "new_tokens_per_image",
    "examples"} of evaluation entries (``data.caption_formats.load_caption_test``)."""
    from tqdm import tqdm

    name = type(model).__name__
    if name not in CLASSES:
        raise ValueError(f"vlprune eval caption --hf needs one of {list(CLASSES)}, got {name}")
    results: List[Dict[str, Any]] = []
    tokens: List[int] = []
    new = 0
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(entries), batch_size), disable=not progress, desc="eval caption (hf)", unit="batch"):
        chunk = entries[s:s + batch_size]
        caps = generate_hf_captions(model, processor, [open_image(image_root / e["image"]) for e in chunk], **gen)
        p = get_patch(model)
        if p is not None and p.last_tokens is not None:
            tokens += [p.last_tokens] * len(chunk)
        new += sum(len(processor.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in caps)
        results += [{"image_id": e["image_id"], "caption": c} for e, c in zip(chunk, caps)]
    seconds = time.perf_counter() - t0
    full = 1 + (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    return {"results": results, "examples": len(entries), "seconds_per_image": seconds / max(len(entries), 1),
            "image_tokens": sum(tokens) / len(tokens) if tokens else float(full),
            "new_tokens_per_image": new / max(len(entries), 1)}


__all__ = ["evaluate_hf_caption", "generate_hf_captions", "CLASSES"]
