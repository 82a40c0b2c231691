"""Image-text retrieval fine-tuning and evaluation.

ALBEF-style (any method but LAPS): ITC (momentum distillation, queues) + ITM with hard negatives, the pre-training
objectives without MLM (``PretrainTask``); ITC targets are spread over every key with the same ``image_id``
(two captions of one image are not negatives). Evaluation: the two-stage protocol of ``tasks.retrieval`` (ITC for
all pairs from text-free image features, then ITM re-ranking of the top ``k`` with text-guided tokens).

LAPS (``--method laps``): a retrieval model on its own: the two encoders (no fusion encoder, no ITM), the LAPS
head's slimmed patch-word similarity (``reduce.laps``), trained with the bidirectional triplet loss (margin 0.2,
hardest in-batch negatives; positives = same image id) plus ``ratio`` * the ratio loss; evaluation ranks every
image-caption pair by the LAPS similarity (rSum is reported as ``r_sum``, with ``r_mean``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

from ..data.datasets import load_entry_image
from ..data.formats import load_annotations
from ..objectives.laps import laps_loss
from ..reduce.laps import laps_similarity
from ..reduce.registry import installed_spec
from .base import StepContext, register_task
from .metrics import retrieval_metrics
from .pretrain import PretrainTask
from .retrieval import evaluate_retrieval


def is_laps(model) -> bool:
    """Whether the installed method scores image-caption pairs itself (``scores_pairs``: LAPS's similarity)."""
    spec = installed_spec(model)
    return spec is not None and spec.scores_pairs


@register_task("retrieval")
class RetrievalTask(PretrainTask):
    name = "retrieval"
    scenes_file, scenes_test = "retrieval_train.json", "retrieval_test.json"

    def __init__(self, itc: float = 1.0, itm: float = 1.0, alpha: float = 0.4, k: int = 128, margin: float = 0.2,
                 ratio: float = 2.0, hardest: bool = True, chunk: int = 64, hard_ramp: float = 0.0,
                 gallery_chunk: int = 0, search: str = "auto"):
        # hard_ramp 0: ITM negatives hard from the first step, as ALBEF fine-tunes (PretrainTask explains the ramp)
        super().__init__(itc=itc, itm=itm, mlm=0.0, alpha=alpha, hard_ramp=hard_ramp)
        if int(k) < 1:
            raise ValueError(f"k (ITM re-ranking candidates) must be >= 1, got {k}")
        self.k, self.margin, self.ratio, self.hardest, self.chunk = int(k), float(margin), float(ratio), bool(hardest), int(chunk)
        self.gallery_chunk, self.search = int(gallery_chunk), str(search)  # > 0: tasks.retrieval_large

    def check_model(self, model) -> None:
        if model.cfg.arch != "albef":
            raise ValueError(f"the retrieval task needs a two-stream model (arch='albef'), got arch={model.cfg.arch!r}")

    def load(self, path) -> List[Dict[str, Any]]:
        return load_annotations(path, "retrieval_train")

    def load_test(self, path) -> List[Dict[str, Any]]:
        return load_annotations(path, "retrieval_test")

    def step(self, model, batch: Dict[str, Any], ctx: StepContext, update: bool = True) -> Dict[str, Tensor]:
        if not is_laps(model):
            return super().step(model, batch, ctx, update)
        text = model.encode_text(batch["ids"], batch["mask"])
        image = model.encode_image(batch["images"])  # LAPS leaves the ViT alone: no text guidance there
        S, D = laps_similarity(model, image, text, batch["mask"], ctx.generator, return_decisions=True)
        res = laps_loss(S, D, model.laps.rho, self.margin, self.hardest, self.ratio, batch["image_id"])
        return {"loss": res["total"], "triplet": res["triplet"].detach(), "ratio": res["ratio"].detach()}

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate_set(self, model, entries, loader, tok, batch_size: int, device, rank: int = 0, world: int = 1,
                     progress=None) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """Metrics and {"examples", "image_tokens", "images", "captions", ...} of a retrieval-test file."""
        if self.gallery_chunk > 0 and not is_laps(model):
            return self._large(model, entries, loader, tok, batch_size, device, rank, world, progress)
        images = torch.stack([load_entry_image(loader, e["image"], i) for i, e in enumerate(entries)]).to(device)
        img2txt, txt2img, captions = _caption_index(entries)
        ids, mask = tok.encode(captions, model.cfg.text.max_len)
        ids, mask = ids.to(device), mask.to(device)
        info: Dict[str, Any] = {"images": len(entries), "captions": len(captions)}
        if is_laps(model):
            metrics = self._laps(model, images, ids, mask, img2txt, txt2img, batch_size, rank, world)
            info["image_tokens"] = float(1 + model.cfg.vision.num_patches)  # LAPS slims after the ViT
            info["slimmed_tokens"] = float(1 + model.laps.num_aggr + 1)
        else:
            metrics, cost = evaluate_retrieval(model, images, ids, mask, img2txt, txt2img, self.k, batch_size,
                                               progress, rank, world)
            info.update(itm_pairs=cost.itm_pairs, itc_seconds=cost.itc_seconds, itm_seconds=cost.itm_seconds)
            n = min(batch_size, len(txt2img))
            probe = images[torch.tensor(txt2img[:n], device=device)]
            info["image_tokens"] = float(model.encode_image(probe, model.encode_text(ids[:n], mask[:n]), mask[:n]).num_tokens)
        info["examples"] = len(entries)
        return metrics, info

    def _large(self, model, entries, loader, tok, batch_size, device, rank, world, progress):
        """The bounded-memory path (``tasks.retrieval_large``): images loaded, encoded and searched in chunks."""
        from .retrieval_large import evaluate_large_gallery

        img2txt, txt2img, captions = _caption_index(entries)
        ids, mask = (t.to(device) for t in tok.encode(captions, model.cfg.text.max_len))

        def load(rows):
            return torch.stack([load_entry_image(loader, entries[i]["image"], i) for i in rows])

        metrics, cost = evaluate_large_gallery(model, len(entries), load, ids, mask, img2txt, txt2img, self.k,
                                               batch_size, self.gallery_chunk, self.search, progress, rank, world)
        n = min(batch_size, len(txt2img))
        probe = load(txt2img[:n]).to(device)
        tokens = model.encode_image(probe, model.encode_text(ids[:n], mask[:n]), mask[:n]).num_tokens
        return metrics, {"images": len(entries), "captions": len(captions), "itm_pairs": cost.itm_pairs,
                         "itc_seconds": cost.itc_seconds, "itm_seconds": cost.itm_seconds,
                         "image_tokens": float(tokens), "examples": len(entries)}

    def _laps(self, model, images, ids, mask, img2txt, txt2img, batch_size, rank, world) -> Dict[str, float]:
        text = torch.cat([model.encode_text(ids[s:s + batch_size], mask[s:s + batch_size])
                          for s in range(0, ids.shape[0], batch_size)])
        n_img = images.shape[0]
        sim = torch.zeros(n_img, ids.shape[0], device=images.device)
        mine = list(range(rank, n_img, world))
        for s in range(0, len(mine), batch_size):
            rows = torch.tensor(mine[s:s + batch_size], device=images.device)
            state = model.encode_image(images[rows])
            sim[rows] = laps_similarity(model, state, text, mask, chunk=self.chunk).float()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(sim)
        return retrieval_metrics(sim.cpu(), img2txt, txt2img)


def _caption_index(entries) -> Tuple[List[List[int]], List[int], List[str]]:
    """(img2txt, txt2img, captions) of retrieval-test entries: every image's caption indices, every caption's image."""
    captions: List[str] = []
    img2txt: List[List[int]] = []
    txt2img: List[int] = []
    for i, e in enumerate(entries):
        img2txt.append(list(range(len(captions), len(captions) + len(e["caption"]))))
        captions += e["caption"]
        txt2img += [i] * len(e["caption"])
    return img2txt, txt2img, captions
