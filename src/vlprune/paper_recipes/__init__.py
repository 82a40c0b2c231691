"""One recipe per seed paper table: the paper's settings as a list of training stages, with the numbers the paper
reports and an estimate of the cost, runnable with ``vlprune reproduce NAME`` (``vlprune.paper_recipes.run``).

A recipe is a JSON file in this package (``RECIPE.json``)::

    name, title, paper, tables, settings_source   what it reproduces and where each setting comes from
    model          a model preset (albef-base, vilt-base)
    method         {"name", "layers", "keep", "options"}: the paper's reduction (a stage may set "method": null)
    stages         [{name, task, train: [DATA/SPLIT, ...], val, answers, init, image_size, epochs, batch (global),
                     lr, min_lr, warmup_steps | warmup_fraction, weight_decay, grad_clip, k, teacher, tip_stage,
                     grad_checkpointing, note, runnable, why}]
    reported       [{what, verified, values: {METRIC: value} | null, source | fill_from + why_null}]: the numbers
                   as published. ``verified: true`` entries were read from the named ``source`` (a paper table or an
                   official README) and every value is a number; the others hold only nulls, with ``fill_from``
                   naming the table to copy them from and ``why_null`` saying why they are not filled in

``train`` / ``val`` / ``answers`` name what ``vlprune data prepare`` writes under ``--data``: ``coco/train`` is
``DATA/coco/train.json``; a pre-training set (``pretrain-4m``) means its shards. ``init`` is ``"stage:NAME"`` (the
model of an earlier stage), ``"checkpoint"`` (the ``--init`` given to ``vlprune reproduce``) or absent (from
scratch). A stage with ``"runnable": false`` is listed in the plan with its reason and never run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).parent
TASKS = ("pretrain", "retrieval", "vqa", "nlvr2", "ve")
STAGE_KEYS = {"name", "task", "train", "val", "answers", "init", "image_size", "epochs", "batch", "lr", "min_lr",
              "warmup_steps", "warmup_fraction", "weight_decay", "grad_clip", "k", "teacher", "tip_stage", "note",
              "runnable", "why", "method", "grad_checkpointing"}
RECIPE_KEYS = {"name", "title", "paper", "tables", "model", "method", "settings_source", "stages", "reported", "init"}


def list_recipes() -> List[str]:
    return sorted(p.stem for p in HERE.glob("*.json"))


def _check_stage(s: Dict[str, Any], where: str, names: List[str]) -> None:
    unknown = sorted(set(s) - STAGE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown stage key(s) {unknown}; valid: {sorted(STAGE_KEYS)}")
    for key in ("name", "task"):
        if not isinstance(s.get(key), str):
            raise ValueError(f"{where}: stage needs a string {key!r}, got {s.get(key)!r}")
    if s.get("runnable", True) is False:
        if not s.get("why"):
            raise ValueError(f"{where}: stage {s['name']} is not runnable but says no 'why'")
        return
    if s["task"] not in TASKS:
        raise ValueError(f"{where}: stage {s['name']} has task {s['task']!r}; runnable tasks: {list(TASKS)}")
    if not (isinstance(s.get("train"), list) and s["train"] and all(isinstance(t, str) for t in s["train"])):
        raise ValueError(f"{where}: stage {s['name']} needs 'train': a list of DATA/SPLIT names")
    for key in ("image_size", "epochs", "batch"):
        v = s.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: stage {s['name']} field {key!r} must be an integer >= 1, got {v!r}")
    if not isinstance(s.get("grad_checkpointing", False), bool):
        raise ValueError(f"{where}: stage {s['name']} field 'grad_checkpointing' must be true or false, got "
                         f"{s['grad_checkpointing']!r}")
    if not (isinstance(s.get("lr"), (int, float)) and s["lr"] > 0):
        raise ValueError(f"{where}: stage {s['name']} field 'lr' must be > 0, got {s.get('lr')!r}")
    init = s.get("init")
    if init is not None and init != "checkpoint" and not (isinstance(init, str) and init.startswith("stage:")
                                                          and init[6:] in names):
        raise ValueError(f"{where}: stage {s['name']} init {init!r} must be 'checkpoint' or 'stage:NAME' of an "
                         f"earlier stage ({names})")
    if s.get("teacher") is not None and s["teacher"] not in names:
        raise ValueError(f"{where}: stage {s['name']} teacher {s['teacher']!r} is not an earlier stage ({names})")


def _check_reported(entries: Any, where: str) -> None:
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: needs a non-empty 'reported' list")
    for e in entries:
        what = e.get("what") if isinstance(e, dict) else None
        if not isinstance(what, str) or not isinstance(e.get("verified"), bool):
            raise ValueError(f"{where}: each reported entry needs a string 'what' and a true/false 'verified', got {e!r}")
        values = e.get("values")
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"{where}: reported {what!r}: 'values' must be an object or null, got {values!r}")
        numbers = [v for v in (values or {}).values() if v is not None]
        if e["verified"]:
            if not values or len(numbers) != len(values) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
                raise ValueError(f"{where}: reported {what!r} is verified, so every value must be a number")
            if not isinstance(e.get("source"), str) or not e["source"]:
                raise ValueError(f"{where}: reported {what!r} is verified but names no 'source'")
        elif numbers or not e.get("fill_from") or not e.get("why_null"):
            raise ValueError(f"{where}: reported {what!r} is not verified: its values must be null, with "
                             f"'fill_from' and 'why_null' saying where to copy them from and why they are missing")


def validate_recipe(data: Any, where: str) -> Dict[str, Any]:
    """Check a parsed recipe; raises ValueError naming ``where``, the stage and the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a recipe is a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown recipe key(s) {unknown}; valid: {sorted(RECIPE_KEYS)}")
    for key in ("name", "title", "paper", "model"):
        if not isinstance(data.get(key), str):
            raise ValueError(f"{where}: needs a string {key!r}")
    if not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ValueError(f"{where}: needs a non-empty 'stages' list")
    names: List[str] = []
    for s in data["stages"]:
        if not isinstance(s, dict):
            raise ValueError(f"{where}: each stage is an object, got {s!r}")
        _check_stage(s, where, names)
        if s["name"] in names:
            raise ValueError(f"{where}: stage name {s['name']!r} used twice")
        names.append(s["name"])
    _check_reported(data.get("reported"), where)
    return data


def load_recipe(name: str) -> Dict[str, Any]:
    """A recipe by name (``list_recipes()``) or by the path of a recipe JSON file."""
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        path = p
    elif name in list_recipes():
        path = HERE / f"{name}.json"
    else:
        raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(list_recipes())} (or a recipe .json file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return validate_recipe(data, str(path))
