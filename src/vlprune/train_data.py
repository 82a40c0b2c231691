"""Where the trainer's data comes from: the built-in scenes data, a JSON annotation file with an image root, or
tar shards; the checks made before a run directory is created; the data position a checkpoint records; and the
stream of micro-batches a run (or a resumed run) reads, epoch after epoch.

``TrainConfig`` fields used: train, images, val, tokenizer, init, batch_size, seed, skip_bad_images,
max_image_pixels, allow_outside_root, shuffle_buffer, scenes_images, scenes_seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .data.datasets import ResumableSampler, check_image_paths
from .data.images import ImageLoader
from .data.shards import expand_pattern, is_shard_spec
from .distributed import barrier


def scenes_data(cfg, task, out: Path, image_size: int, rank: int, world: int):
    """(entries, image root) of the built-in scenes data, generated into ``out/data`` (once)."""
    from .data.scenes import generate

    root = out / "data"
    if rank == 0 and not (root / task.scenes_file).is_file():
        generate(root, images=cfg.scenes_images, seed=cfg.scenes_seed, image_size=image_size)
    barrier(world)
    return task.load(root / task.scenes_file), root


def shard_captions(cfg, out: Path, rank: int):
    """(entries, image root) of a tar-shard run: the captions, when a tokenizer must be trained from them (rank 0,
    no --tokenizer, no init, none saved yet), else none; the images are streamed later."""
    from .data.shard_dataset import shard_texts

    need = rank == 0 and cfg.tokenizer is None and cfg.init is None and not (out / "tokenizer" / "tokenizer.json").is_file()
    entries = [{"caption": t} for t in shard_texts(cfg.train)] if need else []
    return entries, Path(cfg.images) if cfg.images else Path(expand_pattern(cfg.train)[0]).parent


def build_data(cfg, task, entries, mcfg, root: Path, rank: int, world: int):
    """(dataset, sampler or None, position): ``position.num_samples`` per rank and epoch,
    ``position.set_position(epoch, skip)``, ``position.state()`` for the checkpoint's "data" entry."""
    if is_shard_spec(cfg.train):
        from .data.shard_dataset import ShardDataset

        ds = ShardDataset(cfg.train, ImageLoader.for_model(mcfg.vision, None, cfg.max_image_pixels), cfg.batch_size,
                          rank, world, cfg.seed,
                          cfg.shuffle_buffer, cfg.skip_bad_images)
        return ds, None, ds
    dataset = task.build_dataset(entries, image_loader(cfg, mcfg, root), cfg.skip_bad_images)
    sampler = ResumableSampler(dataset, world, rank, shuffle=True, seed=cfg.seed)
    return dataset, sampler, sampler


def data_state(position, micro: int, per_epoch: int, batch_size: int) -> Dict[str, Any]:
    """The checkpoint's "data" entry: where this rank's data continues (epoch, first sample of the next
    micro-batch in the rank's epoch order) and the source's own record (shards: their fingerprint)."""
    epoch, offset = divmod(micro, per_epoch)
    own = position.state() if hasattr(position, "state") else {"kind": "json"}
    return {**own, "epoch": epoch, "next_sample": offset * batch_size}


def check_data_state(saved: Optional[Dict[str, Any]], position, out: Path) -> None:
    if saved is None or not hasattr(position, "state"):
        return
    now = position.state()
    if saved.get("fingerprint") != now["fingerprint"]:
        raise ValueError(f"cannot resume {out}: the training shards differ from the checkpoint's (names or sample "
                         "counts in the manifest changed); resume with the same shards")


def validate_inputs(cfg, task, mcfg, world: int):
    """Everything that can be checked before the run directory is touched: the annotation files, the image paths
    in them (inside the image root), the batch size against the data, and where the tokenizer comes from. Returns
    (entries, image root) of a --train file, or (None, None) for the built-in scenes data."""
    if cfg.tokenizer is None and cfg.init is not None:
        from .tasks.finetune import tokenizer_dir

        if tokenizer_dir(cfg.init) is None:
            raise FileNotFoundError(f"no tokenizer found with the init checkpoint {cfg.init}; give --tokenizer")
    entries = root = None
    if is_shard_spec(cfg.train):
        if task.name not in ("pretrain", "retrieval"):
            raise ValueError(f"tar shards hold image-caption pairs (tasks pretrain, retrieval), not task {cfg.task!r}")
        build_data(cfg, task, None, mcfg, None, 0, world)  # the shards, their manifest and the batch size
    elif cfg.train is not None:
        path = Path(cfg.train)
        entries, root = task.load(path), Path(cfg.images) if cfg.images else path.parent
        check_image_paths(entries, image_loader(cfg, mcfg, root))
        batches_per_epoch(len(entries), world, cfg)
    if cfg.val is not None:
        val = task.load_test(cfg.val)  # evaluated with the training image root (of the scenes data: not yet made)
        if root is not None:
            check_image_paths(val, image_loader(cfg, mcfg, root))
    return entries, root


def image_loader(cfg, mcfg, root) -> ImageLoader:
    return ImageLoader.for_model(mcfg.vision, root, cfg.max_image_pixels, cfg.allow_outside_root)


def batches_per_epoch(n: int, world: int, cfg) -> int:
    per_epoch = (n // world) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"{n} samples over {world} process(es) give no full batch of {cfg.batch_size} (--batch-size)")
    return per_epoch


def micro_batches(loader, position, per_epoch: int, batch_size: int, micro: int):
    """(epoch, batch) from micro-batch number ``micro`` on, epoch after epoch, without end."""
    while True:
        epoch, offset = divmod(micro, per_epoch)
        position.set_position(epoch, offset * batch_size)
        for batch in loader:
            yield epoch, batch
            micro += 1


def fetch(batches, n: int):
    """The next ``n`` micro-batches (one optimiser step's) and the error that stopped reading them, or None. An
    error re-raised from a DataLoader worker comes back with its own message (the worker's traceback is kept as
    the error's ``__cause__``, shown with ``--debug``)."""
    group = []
    try:
        for _ in range(n):
            group.append(next(batches))
    except Exception as e:  # a bad image, a worker that died, ...
        return group, worker_error(e)
    return group, None


def worker_error(e: Exception) -> Exception:
    """``e`` without the worker traceback that ``torch.utils.data`` puts into the message of an error raised in a
    worker process ("Caught X in DataLoader worker process N. Original Traceback ..."): the same type with the
    original message, chained to ``e``. Any other error is returned as it is."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    cls = type(e)
    names = (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: ")
    at = max((text.rfind(n), n) for n in names)
    if at[0] < 0:
        return e
    try:
        clean = cls(text[at[0] + len(at[1]):].strip())
    except Exception:  # an exception type that needs other arguments
        return e
    clean.__cause__ = e
    return clean


def input_paths(cfg) -> List[Tuple[str, Optional[str]]]:
    """(flag, path) of every local file or directory a run of ``cfg`` reads: ``--overwrite`` never deletes a
    directory that is or holds one of them."""
    from .data.shards import MANIFEST, is_url

    out: List[Tuple[str, Optional[str]]] = []
    if is_shard_spec(cfg.train):
        if not is_url(cfg.train):
            names = expand_pattern(cfg.train)
            out += [("--train", n) for n in names] + [("--train (manifest)", str(Path(names[0]).parent / MANIFEST))]
    else:
        out.append(("--train", cfg.train))
    out += [("--val", cfg.val), ("--images", cfg.images), ("--init", cfg.init), ("--tokenizer", cfg.tokenizer)]
    return out + [(f"--{key}", cfg.task_options.get(key)) for key in ("teacher", "answers")]
