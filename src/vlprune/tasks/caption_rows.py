"""Report rows for the demo: CIDEr of a trained captioner and grounding accuracy of a two-stream run, per method,
with 95% percentile-bootstrap intervals over images / expressions, plus their baselines (a blind captioner that
sees the mean-colour image, zeros after normalisation; a uniformly drawn candidate box).

CIDEr's interval resamples the per-image CIDEr-D scores (the corpus score is their mean; the document frequencies
stay those of all the references).

    from vlprune.tasks.caption_rows import caption_rows, grounding_rows
    caption_rows("runs/demo/caption", [None, ReduceConfig("tome", layers=(2, 4), options={"r": 8})])
    grounding_rows("runs/demo/retrieval", [None, ReduceConfig("trips", layers=(3,), keep=0.5)])
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..data.images import ImageLoader
from ..data.tokenizer import TextTokenizer
from ..models.build import load_pretrained
from ..stats import bootstrap_ci
from .caption import PROMPT, CaptionTask
from .caption_metrics import caption_scores
from .finetune import checkpoint_dir, tokenizer_dir


def _load(run, method):
    ckpt = checkpoint_dir(run)
    model = load_pretrained(ckpt, method=method if method is not None else None).eval()
    tok = TextTokenizer.from_dir(tokenizer_dir(ckpt))
    data = (ckpt.parent if ckpt.name == "model" else ckpt) / "data"
    return model, tok, data


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be an integer >= 0 (0 = every entry), got {limit!r}")


def _interval(name: str, scores: Sequence[float], n_boot: int) -> Dict[str, float]:
    ci = bootstrap_ci(scores, n_boot=n_boot)
    return {name: ci.mean, f"{name}_low": ci.low, f"{name}_high": ci.high}


@torch.no_grad()
def caption_scores_of(model, tok, entries, loader, batch_size: int = 32, blind: bool = False,
                      task: Optional[CaptionTask] = None) -> Dict[str, Any]:
    """Corpus scores, per-image CIDEr, seconds per image and image tokens of one captioner on ``entries``."""
    task = task or CaptionTask()
    t0 = time.perf_counter()
    results, tokens, _ = task.generate_all(model, entries, list(range(len(entries))), loader, tok, batch_size, blind)
    seconds = (time.perf_counter() - t0) / len(entries)
    corpus, per, used = caption_scores(results, task.references_of(entries), task.tokenizer)
    return {"corpus": corpus, "per_image_cider": per["CIDEr"], "seconds_per_image": seconds,
            "image_tokens": tokens / len(entries), "metric_tokenizer": used}


def caption_rows(run, methods: Sequence[Any], test: Optional[str] = None, images: Optional[str] = None,
                 batch_size: int = 32, n_boot: int = 2000, blind: bool = True, limit: int = 0,
                 **task_options: Any) -> List[Dict[str, Any]]:
    """One row per method (None = unpruned; a method name or ReduceConfig) of a caption run, then the blind row:
    {"method", "CIDEr", "CIDEr_low", "CIDEr_high", "Bleu_4", "ROUGE_L", "image_tokens", "seconds_per_image"}.
    ``limit``: caption the first ``limit`` test images only (0 = all)."""
    _check_limit(limit)
    task = CaptionTask(**task_options)
    rows = []
    plan = [(m, False) for m in methods] + ([(None, True)] if blind else [])
    for method, is_blind in plan:
        model, tok, data = _load(run, method)
        path = Path(test) if test else data / task.scenes_test
        entries = task.load_test(path)
        entries = entries[:limit] if limit else entries
        loader = ImageLoader.for_model(model.cfg.vision, Path(images) if images else path.parent)
        r = caption_scores_of(model, tok, entries, loader, batch_size, is_blind, task)
        rc = model.method_config
        name = "blind (grey image)" if is_blind else ("none" if rc is None else rc.name)
        rows.append({"method": name, "method_config": None if rc is None else rc.to_dict(),
                     **_interval("CIDEr", r["per_image_cider"], n_boot), "Bleu_4": r["corpus"]["Bleu_4"],
                     "ROUGE_L": r["corpus"]["ROUGE_L"], "image_tokens": r["image_tokens"],
                     "seconds_per_image": r["seconds_per_image"], "examples": len(entries),
                     "metric_tokenizer": r["metric_tokenizer"]})
    return rows


def grounding_rows(run, methods: Sequence[Any], test: Optional[str] = None, images: Optional[str] = None,
                   batch_size: int = 32, n_boot: int = 2000, mode: str = "itm", limit: int = 0,
                   layer: Optional[int] = None) -> List[Dict[str, Any]]:
    """One row per method of a two-stream run (pre-training or retrieval) on the grounding test file, then the
    random-box row: {"method", "accuracy", "accuracy_low", "accuracy_high", "kept_fraction", "image_tokens"}.
    ``limit``: the first ``limit`` expressions only (0 = all); ``layer``: the Grad-CAM fusion layer (0-based)."""
    _check_limit(limit)
    from ..data.scenes_refs import write_scenes_refs
    from .refgrounding import evaluate_grounding, load_grounding, random_box_accuracy

    rows = []
    entries = None
    for method in methods:
        model, tok, data = _load(run, method)
        path = Path(test) if test else data / "grounding_test.json"
        if not path.is_file() and test is None:
            write_scenes_refs(data)
        entries = load_grounding(path)
        entries = entries[:limit] if limit else entries
        loader = ImageLoader.for_model(model.cfg.vision, Path(images) if images else path.parent)
        t0 = time.perf_counter()
        res = evaluate_grounding(model, entries, loader, tok, batch_size, mode, layer)
        rc = model.method_config
        rows.append({"method": "none" if rc is None else rc.name, "method_config": None if rc is None else rc.to_dict(),
                     **_interval("accuracy", [100 * h for h in res["hits"]], n_boot),
                     "kept_fraction": res["kept_fraction"], "image_tokens": res["image_tokens"],
                     "seconds_per_example": (time.perf_counter() - t0) / len(entries), "examples": len(entries)})
    if entries is not None:
        rows.append({"method": "random box", "method_config": None,
                     **_interval("accuracy", [100 * h for h in random_box_accuracy(entries)], n_boot),
                     "examples": len(entries)})
    return rows


__all__ = ["caption_rows", "grounding_rows", "caption_scores_of", "PROMPT"]
