"""Evaluation of a fine-tuned model on a test file: batched, under ``torch.inference_mode``, with a progress bar,
split across DDP ranks (rank r takes examples r, r + W, ...: no padding duplicates) and gathered on every rank
(results keyed by the example index, so nothing is counted twice); plus the cost figures every report carries:
the image-encoder GFLOPs of one example and the average number of image tokens after the image encoder.

GFLOPs are counted by running the model under ``torch.utils.flop_counter.FlopCounterMode`` on one example
(batch 1): the ViT of a two-stream model, guided by the example's text (the text encoder runs outside the
count); the whole joint encoder of a single-stream model; both images of an NLVR2 pair.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..data.datasets import Collate
from ..flopcount import flop_counter_mode


def image_encoder_gflops(model, images: Tensor, ids: Tensor, mask: Tensor) -> float:
    """GFLOPs of encoding one example's image(s): images (1, 3, S, S) or an NLVR2 pair (1, 2, 3, S, S)."""
    imgs = images if images.dim() == 5 else images.unsqueeze(1)
    with torch.inference_mode():
        text = model.shared_text(ids, mask)  # outside the count
        with flop_counter_mode() as fc:
            for j in range(imgs.shape[1]):
                model.image_pass(imgs[:, j], ids, mask, text)
    return fc.get_total_flops() / 1e9


def _gather(obj: Any, world: int) -> List[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _to(batch: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.inference_mode()
def predict_all(task, model, dataset, tok, batch_size: int, device, rank: int = 0, world: int = 1,
                progress: bool = False) -> Tuple[List[Any], float]:
    """Every example's prediction (in dataset order) and the mean image-token count per example."""
    from tqdm import tqdm

    mine = Subset(dataset, list(range(rank, len(dataset), world)))
    dl = DataLoader(mine, batch_size=batch_size, shuffle=False, collate_fn=Collate(tok, model.cfg.text.max_len))
    preds: Dict[int, Any] = {}
    tokens = 0.0
    for batch in tqdm(dl, disable=not (progress and rank == 0), desc=f"eval {task.name}", unit="batch", dynamic_ncols=True):
        if not batch.get("size"):
            continue
        batch = _to(batch, device)
        p, n = task.predict(model, batch)
        preds.update(zip(batch["index"].tolist(), p))
        tokens += float(n.sum())
    merged: Dict[int, Any] = {}
    total_tokens = 0.0
    for part_preds, part_tokens in _gather((preds, tokens), world):
        merged.update(part_preds)
        total_tokens += part_tokens
    missing = [i for i in range(len(dataset)) if i not in merged]
    if missing:
        raise RuntimeError(f"{len(missing)} example(s) have no prediction (bad images? first: {missing[0]})")
    return [merged[i] for i in range(len(dataset))], total_tokens / len(dataset)


def _probe(task, model, entries, loader, tok, device) -> Tuple[Tensor, Tensor, Tensor]:
    """One example as a batch of 1 for the FLOP count."""
    if task.name == "retrieval":
        img = loader(entries[0]["image"]).unsqueeze(0)
        ids, mask = tok.encode([entries[0]["caption"][0]], model.cfg.text.max_len)
        return img.to(device), ids.to(device), mask.to(device)
    b = _to(Collate(tok, model.cfg.text.max_len)([task.build_dataset(entries[:1], loader)[0]]), device)
    return b["images"], b["ids"], b["mask"]


def evaluate(task, model, entries, loader, tok, batch_size: int = 32, device=None, rank: int = 0, world: int = 1,
             progress: bool = False) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """(metrics, info) of ``model`` (put in eval mode) on test ``entries``; info has "examples", "gflops",
    "image_tokens", for the classification tasks "predictions" (one per entry, in order), and task-specific
    figures."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    device = device or next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        if hasattr(task, "evaluate_set"):
            metrics, info = task.evaluate_set(model, entries, loader, tok, batch_size, device, rank, world,
                                              _bar(progress and rank == 0, task.name))
        else:
            preds, tokens = predict_all(task, model, task.build_dataset(entries, loader), tok, batch_size, device,
                                        rank, world, progress)
            metrics = task.score(entries, preds)
            info = {"examples": len(entries), "image_tokens": tokens, "predictions": preds}
    info["gflops"] = image_encoder_gflops(model, *_probe(task, model, entries, loader, tok, device))
    return metrics, info


def _bar(on: bool, name: str) -> Optional[Any]:
    if not on:
        return None
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=f"eval {name} (re-rank)", unit="query", dynamic_ncols=True)
