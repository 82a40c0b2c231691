"""Image captioning on the two-stream model (``vlprune train caption`` / ``vlprune eval caption``).

The decoder is the model's own text + fusion stack run causally (``models.captioner``). BLIP's recipe: the text is
``prompt + pre_caption(caption)`` with the prompt "a picture of "; the tokens of [CLS] + prompt carry no loss; next
-token cross-entropy with label smoothing 0.1. vlprune's tokenizer has no [DEC] token, so [CLS] starts a caption
and [SEP] ends it. Generation: BLIP's beam search (3 beams, max_length 20, min_length 5, both counting the prompt's
tokens, repetition penalty 1.0), the image reduced once, before beam expansion. Results are COCO results JSON
(``[{"image_id", "caption"}]``) scored with pycocoevalcap (``tasks.caption_metrics``).

The image tokens: image-only methods reduce them as usual; a text-guided method raises unless ``guide="prompt"``
(then the prompt's text [CLS] guides the reduction, the same for every image).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..data.caption_formats import load_caption_test, load_caption_train, load_references, pre_caption
from ..data.datasets import AnnotationDataset, load_entry_image
from ..models.captioner import (GenerateConfig, beam_search, check_caption_method, decode, greedy, image_kv,
                                lm_loss, strip_generated)
from ..reduce.state import TokenState
from .base import StepContext, Task, register_task
from .caption_metrics import caption_scores

log = logging.getLogger(__name__)
PROMPT = "a picture of "


class CaptionTrainDataset(AnnotationDataset):
    """{image, text = prompt + pre_caption(caption), index}."""

    def __init__(self, entries, loader, skip_bad_images: bool = False, prompt: str = PROMPT, max_words: int = 30):
        super().__init__(entries, loader, skip_bad_images)
        self.prompt, self.max_words = prompt, max_words

    def item(self, i, e):
        img = self.load(e["image"], i)
        if img is None:
            return None
        text = e["caption"] if isinstance(e["caption"], str) else e["caption"][0]
        return {"image": img, "text": self.prompt + pre_caption(text, self.max_words), "index": i}


def prompt_ids(tok, prompt: str, device=None) -> Tensor:
    """(1, P): [CLS] + the prompt's tokens, no [SEP] (BLIP drops the prompt's final [SEP])."""
    ids = [tok.cls_id] + (tok.tok.encode(prompt, add_special_tokens=False).ids if prompt.strip() else [])
    return torch.tensor([ids], dtype=torch.long, device=device)


def encode_for_caption(model, images: Tensor, tok, prompt: str, guide: Optional[str]) -> TokenState:
    """The image tokens the captioner attends to: reduced by the installed method, once per image; a text-guided
    method is guided by the prompt's text [CLS] when ``guide="prompt"``."""
    check_caption_method(model, guide)
    if guide == "prompt":
        p = prompt_ids(tok, prompt, images.device).expand(images.shape[0], -1)
        ids = torch.cat([p, torch.full_like(p[:, :1], tok.sep_id)], dim=1)
        mask = torch.ones_like(ids)
        return model.encode_image(images, model.encode_text(ids, mask), mask)
    return model.encode_image(images)


def generate_captions(model, images: Tensor, tok, prompt: str = PROMPT, gc: Optional[GenerateConfig] = None,
                      guide: Optional[str] = None) -> Tuple[List[str], TokenState, int]:
    """(captions without the prompt, the reduced image state, generated tokens in all, eos excluded) of images
    (B, 3, S, S); beam search when ``gc.num_beams`` > 1, else greedy."""
    gc = gc or GenerateConfig(eos=tok.sep_id, pad=tok.pad_id)
    image = encode_for_caption(model, images, tok, prompt, guide)
    cache = image_kv(model, image)
    p = prompt_ids(tok, prompt, images.device).expand(images.shape[0], -1)
    seqs = beam_search(model, cache, p, gc) if gc.num_beams > 1 else greedy(model, cache, p, gc)
    gen = strip_generated(seqs, p.shape[1], gc.eos)
    caps = [tok.decode(g).strip() for g in gen]
    return caps, image, sum(len(g) for g in gen)


@register_task("caption")
class CaptionTask(Task):
    name = "caption"
    scenes_file, scenes_test = "caption_train.json", "caption_test.json"

    def __init__(self, prompt: str = PROMPT, smoothing: float = 0.1, max_words: int = 30, num_beams: int = 3,
                 max_length: int = 20, min_length: int = 5, repetition_penalty: float = 1.0,
                 guide: Optional[str] = None, references: Optional[str] = None, tokenizer: str = "auto"):
        if not 0.0 <= float(smoothing) < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.prompt, self.smoothing, self.max_words = str(prompt), float(smoothing), int(max_words)
        self.gen = dict(num_beams=int(num_beams), max_length=int(max_length), min_length=int(min_length),
                        repetition_penalty=float(repetition_penalty))
        GenerateConfig(**self.gen).check()
        self.guide, self.references, self.tokenizer = guide, references, tokenizer
        if guide not in (None, "prompt"):
            raise ValueError(f"guide must be None or 'prompt', got {guide!r}")

    def check_model(self, model) -> None:
        check_caption_method(model, self.guide)

    # -- data ------------------------------------------------------------------------------------------------
    def load(self, path) -> List[Dict[str, Any]]:
        _scenes_files(path)
        return load_caption_train(path)

    def load_test(self, path) -> List[Dict[str, Any]]:
        _scenes_files(path)
        return load_caption_test(path)

    def texts(self, entries):
        caps = [c for e in entries for c in ([e["caption"]] if isinstance(e["caption"], str) else e["caption"])]
        return [self.prompt + pre_caption(c, self.max_words) for c in caps]

    def build_dataset(self, entries, loader, skip_bad_images: bool = False):
        return CaptionTrainDataset(entries, loader, skip_bad_images, self.prompt, self.max_words)

    def generate_config(self, tok) -> GenerateConfig:
        forbid = tuple(i for i in tok.special_ids if i not in (tok.sep_id,))
        return GenerateConfig(**self.gen, eos=tok.sep_id, pad=tok.pad_id, forbid=forbid)

    # -- training ----------------------------------------------------------------------------------------------
    def labels(self, ids: Tensor, mask: Tensor, tok) -> Tensor:
        """ids with the padding and the [CLS] + prompt positions set to -100 (no loss)."""
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : prompt_ids(tok, self.prompt).shape[1]] = -100
        return labels

    def step(self, model, batch: Dict[str, Any], ctx: StepContext, update: bool = True) -> Dict[str, Tensor]:
        tok = ctx.tokenizer
        image = encode_for_caption(model, batch["images"], tok, self.prompt, self.guide)
        logits, _ = decode(model, batch["ids"], batch["mask"], image_kv(model, image))
        loss = lm_loss(logits, self.labels(batch["ids"], batch["mask"], tok), self.smoothing)
        return {"loss": loss, "caption": loss.detach()}

    # -- evaluation ------------------------------------------------------------------------------------------
    def generate_all(self, model, entries, rows, loader, tok, batch_size: int, blind: bool = False):
        """({image_id: caption}, image tokens summed, new tokens summed) over entries ``rows``; ``blind``: every
        image replaced by the mean-colour image (zeros after normalisation), the blind-captioner baseline."""
        gc = self.generate_config(tok)
        dev = next(model.parameters()).device
        results: Dict[int, str] = {}
        tokens = steps = 0.0
        for s in range(0, len(rows), batch_size):
            part = rows[s:s + batch_size]
            images = torch.stack([load_entry_image(loader, entries[i]["image"], i) for i in part]).to(dev)
            if blind:
                images = torch.zeros_like(images)
            caps, image, n = generate_captions(model, images, tok, self.prompt, gc, self.guide)
            results.update({entries[i]["image_id"]: c for i, c in zip(part, caps)})
            tokens += image.num_tokens * len(part)
            steps += n
        return results, tokens, steps

    def references_of(self, entries) -> Dict[int, List[str]]:
        ids = [e["image_id"] for e in entries]
        return load_references(self.references, ids) if self.references else {e["image_id"]: list(e["caption"]) for e in entries}

    def evaluate_set(self, model, entries, loader, tok, batch_size: int, device, rank: int = 0, world: int = 1,
                     progress=None) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """Generate one caption per entry, score them against the entries' captions (or ``references``)."""
        refs = self.references_of(entries)  # a bad reference file fails before generating
        t0 = time.perf_counter()
        results, tokens, steps = self.generate_all(model, entries, list(range(rank, len(entries), world)), loader,
                                                   tok, batch_size)
        seconds = time.perf_counter() - t0
        if world > 1:
            import torch.distributed as dist

            parts: List[Any] = [None] * world
            dist.all_gather_object(parts, (results, tokens, steps, seconds))
            results = {k: v for p in parts for k, v in p[0].items()}
            tokens, steps, seconds = (sum(p[j] for p in parts) for j in (1, 2, 3))
        ids = [e["image_id"] for e in entries]
        metrics, _, used = caption_scores({i: results[i] for i in ids}, refs, self.tokenizer)
        records = [{"image_id": i, "caption": results[i]} for i in ids]
        info = {"examples": len(entries), "image_tokens": tokens / len(entries), "predictions": records,
                "metric_tokenizer": used, "seconds_per_image": seconds / len(entries),
                "new_tokens_per_image": steps / len(entries)}
        return metrics, info

    def prediction_records(self, entries, preds) -> List[Dict[str, Any]]:
        """The COCO results JSON: [{"image_id", "caption"}]."""
        return list(preds)


def _scenes_files(path) -> None:
    """A scenes data directory made before captioning existed: write its caption and grounding files on first use."""
    p = Path(path)
    if not p.is_file() and (p.parent / "scenes.json").is_file():
        from ..data.scenes_refs import write_scenes_refs

        write_scenes_refs(p.parent)


__all__ = ["CaptionTask", "generate_captions", "prompt_ids", "encode_for_caption", "PROMPT"]
