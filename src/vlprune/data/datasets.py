"""Torch datasets over the annotation formats, the batch collator, and a resumable distributed sampler.

A dataset item is a dict: ``image`` (3, S, S) (NLVR2: ``images`` (2, 3, S, S)), ``text`` (a caption, question or
statement), ``index`` (the entry index) and task fields (``image_id``, ``answers``, ``label``...). ``Collate``
stacks tensors (``image`` items become ``batch["images"]`` (B, 3, S, S)), tokenizes ``text`` into ``ids``/``mask`` and drops the samples whose image could not be read
(``skip_bad_images=True``), reporting their number in ``batch["skipped"]`` so that counts survive DataLoader
worker processes.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from .formats import NLVR2_LABELS, VE_LABELS
from .images import BadImageError, ImageLoader, ImagePathError, open_image
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)
SKIP_HINT = "--skip-bad-images skips such samples"


def entry_images(e: Dict[str, Any]) -> List[str]:
    """The image paths of one annotation entry (``image``, or NLVR2's ``images``)."""
    return [e["image"]] if "image" in e else list(e.get("images", ()))


def load_entry_image(loader: ImageLoader, path: str, index: int) -> Tensor:
    """``loader(path)``; a missing or bad image raises the same error type, naming also the annotation entry and
    the flag that skips such samples."""
    try:
        return loader(path)
    except (BadImageError, FileNotFoundError) as e:
        raise type(e)(f"{e} (annotation entry {index}; {SKIP_HINT})") from None


def check_image_paths(entries: Sequence[Dict[str, Any]], loader: ImageLoader) -> None:
    """Raise ``ImagePathError`` naming the first entry (and the count) whose image path leaves the loader's root;
    run before training or evaluation starts, so that such a file never stops a run part-way."""
    bad = []
    for i, e in enumerate(entries):
        for p in entry_images(e):
            try:
                loader.path(p)
            except ImagePathError as err:
                bad.append((i, err))
                break
    if bad:
        i, err = bad[0]
        more = f" ({len(bad)} entries in all)" if len(bad) > 1 else ""
        raise ImagePathError(f"annotation entry {i}: {err}{more}")


def readable_entries(entries: Sequence[Dict[str, Any]], loader: ImageLoader) -> Tuple[List[Dict[str, Any]], List[str]]:
    """(the entries whose images all open, one line per dropped entry naming it and the reason): evaluation with
    ``--skip-bad-images`` scores the rest. Each distinct file is decoded once."""
    ok: Dict[str, Optional[str]] = {}
    kept, dropped = [], []
    for i, e in enumerate(entries):
        reason = None
        for p in entry_images(e):
            if p not in ok:
                try:
                    open_image(loader.path(p), loader.max_pixels)
                    ok[p] = None
                except (BadImageError, FileNotFoundError) as err:
                    ok[p] = str(err)
            reason = reason or ok[p]
        if reason is None:
            kept.append(e)
        else:
            dropped.append(f"annotation entry {i}: {reason}")
    return kept, dropped


class AnnotationDataset(Dataset):
    """Base: entries (validated dicts) + an ImageLoader; ``skip_bad_images`` turns unreadable images into None."""

    def __init__(self, entries: List[Dict[str, Any]], loader: ImageLoader, skip_bad_images: bool = False):
        self.entries = entries
        self.loader = loader
        self.skip_bad_images = skip_bad_images
        self.image_ids = self._image_ids(entries)

    @staticmethod
    def _image_ids(entries) -> List[int]:
        """One integer per distinct image (by ``image_id`` when the entries have it, else by path)."""
        table: Dict[Any, int] = {}
        out = []
        for e in entries:
            key = e.get("image_id", e.get("image", None))
            if key is None:
                key = tuple(e.get("images", ()))
            out.append(table.setdefault(key, len(table)))
        return out

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, path: str, index: int) -> Optional[Tensor]:
        """The image of entry ``index``; a bad one is skipped (None) or raises naming the file and the entry."""
        try:
            return self.loader(path)
        except (BadImageError, FileNotFoundError) as e:
            if not self.skip_bad_images:
                raise type(e)(f"{e} (annotation entry {index}; {SKIP_HINT})") from None
            log.warning("skipping annotation entry %d: %s", index, e)
            return None

    def item(self, i: int, e: Dict[str, Any]) -> Optional[Dict[str, Any]]:  # pragma: no cover - interface
        raise NotImplementedError

    def __getitem__(self, i: int) -> Optional[Dict[str, Any]]:
        return self.item(i, self.entries[i])


class CaptionDataset(AnnotationDataset):
    """Pre-training and retrieval-train entries: {image, text = caption, image_id, index}."""

    def item(self, i, e):
        img = self.load(e["image"], i)
        return None if img is None else {"image": img, "text": e["caption"], "image_id": self.image_ids[i], "index": i}


class VQADataset(AnnotationDataset):
    """{image, text = question, answers (list of str, may be empty on test), question_id, index}."""

    def item(self, i, e):
        img = self.load(e["image"], i)
        if img is None:
            return None
        return {"image": img, "text": e["question"], "answers": list(e.get("answer", [])),
                "question_id": e["question_id"], "index": i}


class NLVR2Dataset(AnnotationDataset):
    """{images (2, 3, S, S), text = sentence, label (1 = True), index}."""

    def item(self, i, e):
        a, b = (self.load(p, i) for p in e["images"])
        if a is None or b is None:
            return None
        return {"images": torch.stack([a, b]), "text": e["sentence"], "label": int(e["label"] == NLVR2_LABELS[0]),
                "index": i}


class VEDataset(AnnotationDataset):
    """{image, text = sentence, label (index into VE_LABELS), index}."""

    def item(self, i, e):
        img = self.load(e["image"], i)
        return None if img is None else {"image": img, "text": e["sentence"], "label": VE_LABELS.index(e["label"]), "index": i}


class Collate:
    """Batches dataset items: stacks tensors, tokenizes ``text`` (ids, mask), drops None items (counted)."""

    def __init__(self, tokenizer: TextTokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __call__(self, items: Sequence[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
        good = [x for x in items if x is not None]
        batch: Dict[str, Any] = {"skipped": len(items) - len(good), "size": len(good)}
        if not good:
            return batch
        for key in good[0]:
            vals = [x[key] for x in good]
            if key == "text":
                batch["ids"], batch["mask"] = self.tokenizer.encode(vals, self.max_len)
                batch["text"] = vals
            elif isinstance(vals[0], Tensor):
                batch["images" if key == "image" else key] = torch.stack(vals)
            elif isinstance(vals[0], int) and not isinstance(vals[0], bool):
                batch[key] = torch.tensor(vals, dtype=torch.long)
            else:
                batch[key] = vals
        return batch


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled per epoch from ``seed + epoch``, split over ranks) that can start an
    epoch part-way: ``set_position(epoch, skip)`` skips this rank's first ``skip`` indices, so a resumed run
    sees exactly the samples an uninterrupted run would have seen next."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        if skip < 0 or skip > self.num_samples:
            raise ValueError(f"skip must be in [0, {self.num_samples}], got {skip}")
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip
