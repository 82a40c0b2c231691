"""Evaluation of a fine-tuned model on a test file: batched, under ``torch.inference_mode``, with a progress bar,
split across DDP ranks (rank r takes examples r, r + W, ...: no padding duplicates) and gathered on every rank
(results keyed by the example index, so nothing is counted twice); plus the cost figures every report carries:
the image-encoder GFLOPs of one example and the average number of image tokens after the image encoder.

GFLOPs are counted by running the model under ``torch.utils.flop_counter.FlopCounterMode`` on one example
(batch 1): the ViT of a two-stream model, guided by the example's text (the text encoder runs outside the
count); the whole joint encoder of a single-stream model; both images of an NLVR2 pair.

``evaluate_run(checkpoint, task, test, method=...)`` is the one evaluation path of a saved model: it reads the
checkpoint (a run directory or a ``save_pretrained`` directory), checks that it was trained for the task, loads the
test file (default: the run's scenes test split), the model with its tokenizer (``load_run``) and the images, and
runs ``evaluate``, under DDP when started by ``torchrun``. ``vlprune eval`` is this function plus printing; the demo
calls it too (its accuracies, per-question scores and predictions are ``RunEvaluation.scores()`` and
``.records()``), so both measure the same way. ``load_run`` is also what the demo's grounding and overlays load a
run with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..config import check_pos_int
from ..data.datasets import Collate
from ..data.images import DEFAULT_MAX_PIXELS
from ..flopcount import flop_counter_mode
from ..reduce.registry import ReduceConfig

log = logging.getLogger(__name__)
# the tasks a saved model can be evaluated on
EVAL_TASKS = ("retrieval", "vqa", "nlvr2", "ve", "caption")


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
    check_pos_int("batch_size", batch_size)
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


# -- a saved model -----------------------------------------------------------------------------------------------
def checkpoint_tasks(meta: dict) -> list:
    """The tasks a checkpoint may be evaluated on, from its config.json: the task its run fine-tuned (``"task"``;
    a pre-training run's ITC/ITM heads are what retrieval uses, so ``pretrain`` gives zero-shot retrieval); a
    checkpoint that records no task (written by ``vlprune.save_pretrained``) gives retrieval for a two-stream model
    and the tasks of the heads it has."""
    task = meta.get("task")
    if task in ("pretrain", "retrieval"):
        return ["retrieval"]
    if task is not None:
        return [task]
    two_stream = meta.get("model", {}).get("arch", "albef") == "albef"
    return sorted(set(meta.get("heads") or {}) & set(EVAL_TASKS) | ({"retrieval"} if two_stream else set()))


def check_task(meta: dict, task: str, ckpt: Path) -> None:
    """Refuse to evaluate ``task`` with a checkpoint never trained for it (``checkpoint_tasks``)."""
    tasks = checkpoint_tasks(meta)
    if task in tasks:
        return
    trained = f"was trained for {meta['task']!r}" if meta.get("task") else "records no task"
    raise ValueError(f"the checkpoint {ckpt} {trained}: it can be evaluated on {', '.join(tasks) or 'no task'}, "
                     f"not {task} (its {'ITC/ITM' if task == 'retrieval' else task} head was never trained for "
                     f"{task}); fine-tune it first: vlprune train {task} --init {ckpt.parent if ckpt.name == 'model' else ckpt}")


def resolve_test_file(test: Optional[Union[str, Path]], run_dir: Path, task) -> Path:
    """``test`` (which must exist), or the run's scenes test split of ``task``."""
    if test is not None:
        path = Path(test)
        if not path.is_file():
            raise FileNotFoundError(f"test annotation file not found: {path}")
        return path
    path = run_dir / "data" / task.scenes_test
    if not path.is_file():
        raise FileNotFoundError(f"no --test given and {path} does not exist (the run was not trained on scenes data)")
    return path


@dataclass
class RunEvaluation:
    """What ``evaluate_run`` measured: the metrics and ``info`` of ``evaluate`` (examples, gflops, image_tokens,
    predictions for the classification tasks, ...), the model's method, the test file and its entries (after
    ``limit`` and ``skip_bad_images``), the entries skipped, the precision and whether the model was compiled.
    ``rank`` is this process's (only rank 0 reports)."""

    task: Any
    test: Path
    metrics: Dict[str, float]
    info: Dict[str, Any]
    method: Optional[ReduceConfig]
    entries: List[Dict[str, Any]]
    dropped: List[str] = field(default_factory=list)
    precision: str = "fp32"
    compiled: bool = False
    rank: int = 0

    def _predictions(self) -> List[Any]:
        preds = self.info.get("predictions")
        if preds is None:
            raise ValueError(f"task {self.task.name!r} gives no per-example predictions (only vqa, nlvr2, ve do)")
        return preds

    def records(self) -> List[Dict[str, Any]]:
        """The per-example predictions in the annotation file's terms (``vlprune eval --predictions`` writes these:
        vqa ``[{question_id, answer}]``, nlvr2 / ve ``[{index, prediction}]``)."""
        return self.task.prediction_records(self.entries, self._predictions())

    def scores(self) -> List[float]:
        """Each example's score in [0, 1], in test-file order, whose mean is the accuracy / 100: the VQA score
        (``metrics.vqa_score``) for vqa, 1.0 for a correct label and 0.0 otherwise for nlvr2 / ve."""
        from .metrics import vqa_score

        preds = self._predictions()
        if self.task.name == "vqa":
            return [vqa_score(p, e["answer"]) for p, e in zip(preds, self.entries)]
        return [float(p == self.task.label_of(e)) for p, e in zip(preds, self.entries)]


def load_run(checkpoint: Union[str, Path], method: Union[str, None, ReduceConfig] = "saved",
             device: Union[str, torch.device] = "cpu") -> Tuple[Any, Any, Dict[str, Any]]:
    """(model in eval mode on ``device``, its tokenizer, its config.json) of a saved model (a run directory or a
    ``save_pretrained`` directory) with ``method`` installed ("saved": the one it was trained with; None or "none":
    no reduction; a name or ReduceConfig: that method). The tokenizer must fit the model's text config."""
    from ..data.tokenizer import TextTokenizer
    from ..models.build import checkpoint_dir, load_pretrained, read_config, tokenizer_dir

    ckpt = checkpoint_dir(checkpoint)
    meta = read_config(ckpt)
    tdir = tokenizer_dir(ckpt)
    if tdir is None:
        raise FileNotFoundError(f"no tokenizer found with the checkpoint {ckpt}")
    model = load_pretrained(ckpt, method=method).to(device).eval()
    tok = TextTokenizer.from_dir(tdir)
    tok.check_model(model.cfg.text)
    return model, tok, meta


def evaluate_run(checkpoint: Union[str, Path], task: str, test: Optional[Union[str, Path]] = None, *,
                 method: Union[str, None, ReduceConfig] = "saved", images: Optional[Union[str, Path]] = None,
                 batch_size: int = 32, task_options: Optional[Dict[str, Any]] = None, precision: str = "fp32",
                 compile: bool = False, skip_bad_images: bool = False, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 allow_outside_root: bool = False, limit: int = 0, progress: bool = False,
                 check_model: Optional[Callable[[Any, Path], None]] = None) -> RunEvaluation:
    """Evaluate a saved model on ``task`` (one of ``EVAL_TASKS``) with ``method`` at inference ("saved": the one it
    was trained with; None or "none": no reduction; a name or ReduceConfig: that method, e.g. ``lowres`` at an
    image size). ``test``: an annotation file (default: the run's scenes test split); ``images``: its image root
    (default: the file's folder); ``limit``: only the first ``limit`` test entries (0 = all). ``task_options`` go to
    the task (e.g. retrieval's ``k``, ``gallery_chunk``, ``search``). Under ``torchrun`` the test set is split across
    the ranks and gathered. ``check_model(model, checkpoint)``, if given, runs on the loaded model before anything
    is evaluated (``vlprune eval`` refuses non-finite weights there)."""
    from ..data.datasets import check_image_paths, readable_entries
    from ..data.images import ImageLoader
    from ..distributed import finish_distributed, setup_distributed
    from ..models.build import checkpoint_dir, read_config
    from ..runtime import check_precision, maybe_compile, precision_context
    from .base import get_task

    check_pos_int("limit", limit, minimum=0)
    ckpt = checkpoint_dir(checkpoint)
    meta = read_config(ckpt)
    check_task(meta, task, ckpt)
    if meta.get("interrupted"):
        log.warning("%s is the model of an interrupted run (step %s of %s)", ckpt, meta.get("step"),
                    meta.get("total_steps"))
    t = get_task(task, **(task_options or {}))
    test = resolve_test_file(test, ckpt.parent if ckpt.name == "model" else ckpt, t)
    if images is not None and not Path(images).is_dir():
        raise FileNotFoundError(f"image root directory not found: {images}")
    entries = t.load_test(test)
    entries = entries[:limit] if limit else entries
    procs = setup_distributed()
    try:
        model, tok, _ = load_run(ckpt, method, procs.device)
        if check_model is not None:
            check_model(model, ckpt)
        precision = check_precision(precision or "fp32", procs.device)
        compiled = maybe_compile(model, compile, procs.device)
        if task not in ("retrieval", "caption") and task not in model.task_heads:
            raise ValueError(f"the checkpoint {ckpt} has no {task!r} head (heads: {list(model.task_heads)}); "
                             f"fine-tune it with 'vlprune train {task}' first")
        t.restore(meta, model)
        loader = ImageLoader.for_model(model.cfg.vision, Path(images) if images else test.parent, max_image_pixels,
                                       allow_outside_root)
        check_image_paths(entries, loader)
        dropped: List[str] = []
        if skip_bad_images:
            entries, dropped = readable_entries(entries, loader)
            for line in dropped:
                log.warning("skipping %s", line)
            if not entries:
                raise ValueError(f"no example of {test} has a readable image ({len(dropped)} skipped)")
        with torch.inference_mode(), precision_context(precision, procs.device):
            metrics, info = evaluate(t, model, entries, loader, tok, batch_size, procs.device, procs.rank,
                                     procs.world, progress=progress)
    finally:
        finish_distributed(procs)
    return RunEvaluation(t, test, metrics, info, model.method_config, entries, dropped, precision, compiled,
                         procs.rank)
