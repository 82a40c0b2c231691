"""Running a recipe's stages in order with ``vlprune.train.train`` (``vlprune reproduce NAME``).

Per stage, into ``OUT/STAGE/`` (a run directory like ``vlprune train``'s): the training files named by the
recipe are read from ``--data`` (``vlprune data prepare``'s output), joined into ``OUT/data/STAGE/*.json`` with
absolute image paths; a pre-training mixture is streamed from its shards. A stage whose model is complete is
skipped; one with a checkpoint resumes; so rerunning the same command continues the recipe. A fine-tuning stage
at another image size than its init gets a copy of the init with interpolated position embeddings
(``OUT/STAGE-init/``). Everything that can be checked (the data, the init checkpoint against the recipe's model)
is checked for every stage before the first one starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..fileio import atomic_write
from .plan import StagePlan, reduce_config

log = logging.getLogger(__name__)

# model config fields that must agree between a checkpoint and a recipe's model
MATCH = ("arch", "vision.patch_size", "vision.width", "vision.layers", "vision.heads", "text.width", "text.layers",
         "fusion_layers")


def _get(d: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d if d != {} else None


def check_checkpoint_matches(init: str, model_cfg, recipe: str) -> None:
    """Raise ValueError naming each field where the ``--init`` checkpoint's model differs from the recipe's."""
    from ..config import to_dict
    from ..models.build import read_config
    from ..tasks.finetune import checkpoint_dir

    saved = read_config(checkpoint_dir(init))["model"]
    want = to_dict(model_cfg)
    diff = [f"{k}: checkpoint {_get(saved, k)!r}, recipe {_get(want, k)!r}" for k in MATCH
            if _get(saved, k) != _get(want, k)]
    if diff:
        raise ValueError(f"--init {init} does not match the model of recipe {recipe} ({'; '.join(diff)}); give a "
                         "checkpoint of that model (an official one: convert it with --init-official in vlprune train)")


def _absolute(entries: List[Dict[str, Any]], root: Path) -> List[Dict[str, Any]]:
    out = []
    for e in entries:
        e = dict(e)
        if "images" in e:
            e["images"] = [str(root / p) for p in e["images"]]
        else:
            e["image"] = str(root / e["image"])
        out.append(e)
    return out


def _as_retrieval_train(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Grounding expressions trained as ALBEF does, as image-text pairs (``text`` -> ``caption``)."""
    return [{"image": e["image"], "caption": e["text"], "image_id": e["image"]} if "text" in e else e for e in entries]


def split_file(data: Path, ref: str) -> Path:
    target, _, split = ref.partition("/")
    return data / target / f"{split or 'train'}.json"


def resolve_data(data: Path, refs: List[str], dest: Path, task: str) -> str:
    """A ``--train`` / ``--val`` value for the stage: a shard pattern, or one JSON file with absolute paths."""
    from ..data.shards import MANIFEST

    shards = [data / r / "shards" for r in refs if (data / r / "shards" / MANIFEST).is_file() and "/" not in r]
    if shards:
        if len(refs) > 1:
            raise ValueError(f"a pre-training mixture is one shard set; got {refs} (prepare pretrain-4m / -14m)")
        manifest = json.loads((shards[0] / MANIFEST).read_text(encoding="utf-8"))
        return str(shards[0] / manifest["pattern"])
    entries: List[Dict[str, Any]] = []
    for ref in refs:
        path = split_file(data, ref)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: prepare it first with `vlprune data prepare "
                                    f"{ref.partition('/')[0]} --root ... --out {data}`")
        root = Path(json.loads((path.parent / "prepared.json").read_text(encoding="utf-8"))["root"])
        entries += _absolute(json.loads(path.read_text(encoding="utf-8")), root)
    if task == "retrieval" and dest.name == "train.json":
        entries = _as_retrieval_train(entries)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda f: f.write(json.dumps(entries, ensure_ascii=False).encode("utf-8")))
    return str(dest)


def stage_state(out: Path) -> str:
    """"done" (a complete model), "resume" (a checkpoint) or "new"."""
    model = out / "model" / "config.json"
    if model.is_file():
        meta = json.loads(model.read_text(encoding="utf-8"))
        if not meta.get("interrupted") and meta.get("step") == meta.get("total_steps"):
            return "done"
    return "resume" if (out / "latest").exists() else "new"


def resized_init(init: str, image_size: int, dest: Path) -> str:
    """``init`` unchanged at its own image size, else a copy at ``image_size`` (position embeddings
    interpolated) with its tokenizer, in ``dest``."""
    import shutil

    from ..models.build import load_pretrained, read_config, save_pretrained
    from ..tasks.finetune import checkpoint_dir, tokenizer_dir

    ckpt = checkpoint_dir(init)
    if read_config(ckpt)["model"]["vision"]["image_size"] == image_size:
        return init
    if not (dest / "model" / "config.json").is_file():
        model = load_pretrained(ckpt, method=None, **{"vision.image_size": image_size})
        save_pretrained(model, dest / "model")
        tok = tokenizer_dir(init)
        if tok is not None:
            shutil.copytree(tok, dest / "tokenizer", dirs_exist_ok=True)
    return str(dest)


def write_model_config(model_cfg, image_size: int, dest: Path) -> str:
    from ..config import override, to_dict

    cfg = to_dict(override(model_cfg, **{"vision.image_size": image_size}))
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda f: f.write(json.dumps(cfg, indent=1).encode("utf-8")))
    return str(dest)


def stage_config(p: StagePlan, data: Path, out: Path, model: str, init: Optional[str], world: int,
                 miniature: bool, batch: Optional[int], options: Dict[str, Any]):
    """The TrainConfig of stage ``p``."""
    from ..recipes import default_task_options
    from ..train import TrainConfig

    s = p.spec
    d = out / "data" / p.name
    train = resolve_data(data, [r for r, _, _ in p.train], d / "train.json", p.task)
    val = resolve_data(data, [p.val], d / "val.json", p.task) if p.val else None
    opts: Dict[str, Any] = dict(default_task_options(p.task, model if init is None else None, init))
    if p.answers:
        opts["answers"] = str(data / p.answers)
    if s.get("teacher"):
        opts["teacher"] = str((out / s["teacher"]).resolve())
    if s.get("tip_stage"):
        opts["stage"] = s["tip_stage"]
    if s.get("k") and val:
        opts["k"] = s["k"]
    per_process = batch if batch is not None else p.batch // world
    lr = float(s["lr"])
    options = {"grad_checkpointing": bool(s.get("grad_checkpointing", False)), **options}  # a run's option wins
    return TrainConfig(
        task=p.task, train=train, val=val, model=model, init=init, method=reduce_config(p.method, miniature),
        steps=p.steps, batch_size=per_process, lr=lr, min_lr_ratio=float(s.get("min_lr", 0.1 * lr)) / lr,
        weight_decay=float(s.get("weight_decay", 0.02)), warmup=min(p.warmup, max(p.steps - 1, 0)),
        grad_clip=float(s.get("grad_clip", 0.0)), task_options=opts, allow_outside_root=True, **options)


def run_plan(recipe: Dict[str, Any], plans: List[StagePlan], data: Path, out: Path, model: str, model_cfg,
             init: Optional[str], world: int = 1, miniature: bool = False, batch: Optional[int] = None,
             stages: Optional[List[str]] = None, options: Optional[Dict[str, Any]] = None,
             say: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Run the runnable stages (all, or ``stages``) in order; returns {stage: train() result or "skipped"}."""
    from ..train import train

    names = [p.name for p in plans]
    bad = [s for s in (stages or []) if s not in names]
    if bad:
        raise ValueError(f"recipe {recipe['name']} has no stage {bad[0]!r}; its stages: {names}")
    chosen = [p for p in plans if p.runnable and (not stages or p.name in stages)]
    needs_init = [p.name for p in chosen if p.init == "checkpoint"]
    if init is not None:
        check_checkpoint_matches(init, model_cfg, recipe["name"])
    elif needs_init and not miniature:
        raise ValueError(f"stage(s) {', '.join(needs_init)} of recipe {recipe['name']} start from a pre-trained "
                         f"checkpoint: give --init (a {recipe['model']} checkpoint)")
    for p in chosen:  # every stage's data exist before the first stage starts
        for ref in [r for r, _, _ in p.train] + ([p.val] if p.val else []) + ([p.answers] if p.answers else []):
            target = data / ref.partition("/")[0]
            if not (target / "prepared.json").is_file():
                raise FileNotFoundError(f"stage {p.name} needs {ref}, but {target} holds no prepared data: run "
                                        f"`vlprune data prepare {ref.partition('/')[0]} --root ... --out {data}`")
    results: Dict[str, Any] = {}
    for p in chosen:
        stage_out = Path(p.out)
        state = stage_state(stage_out)
        if state == "done":
            say(f"stage {p.name}: done already ({stage_out}), skipped")
            results[p.name] = "skipped"
            continue
        stage_init = init if p.init == "checkpoint" else str(out / p.init[6:]) if p.init else None
        if stage_init is not None and not miniature:
            stage_init = resized_init(stage_init, p.image_size, out / f"{p.name}-init")
        stage_model = model
        if stage_init is None and not miniature:  # from scratch at the stage's image size
            stage_model = write_model_config(model_cfg, p.image_size, out / "data" / p.name / "model.json")
        cfg = stage_config(p, data, out, stage_model, stage_init, world, miniature, batch, options or {})
        say(f"stage {p.name}: {p.task}, {p.steps} steps -> {stage_out}" + (" (resuming)" if state == "resume" else ""))
        # "new" with the directory there: a run stopped before its first checkpoint (a killed process, a restart
        # under torchrun --max-restarts) starts again; train() refuses to clear a directory vlprune did not write
        fresh = state == "new" and stage_out.exists()
        results[p.name] = train(cfg, stage_out, resume=state == "resume", overwrite=fresh)
        if results[p.name]["interrupted"]:
            say(f"stage {p.name} interrupted; run the same command again to continue")
            break
    return results
