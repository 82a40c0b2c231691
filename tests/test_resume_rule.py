"""One resume rule: ``vlprune train --resume`` refuses and accepts exactly the changes that the API
(``train.resume_differences``, which ``train(resume=True)`` applies) refuses and accepts, flag by flag."""

from dataclasses import replace

import pytest

from vlprune.cli import GLOBAL_DEFAULTS, _parsers, build_parser, given_flags
from vlprune.commands.method_flags import DEST
from vlprune.commands.train import FLAG_FIELDS, OPTION_FLAGS, _fresh_config, build_config, resumable_flags
from vlprune.config import to_dict
from vlprune.train import CONFIG_FILE, RESUMABLE_CHANGES, TrainConfig, read_train_config, resume_differences

# one changed value per flag that sets a TrainConfig field (the saved run: `train pretrain --steps 2`)
CHANGED = {"train": ["--train", "other.json"], "val": ["--val", "val.json"], "images": ["--images", "imgs"],
           "model": ["--model", "tiny"], "init": ["--init", "runs/pt"], "batch_size": ["--batch-size", "8"],
           "accum": ["--accum", "2"], "lr": ["--lr", "0.5"], "lr_mult": ["--lr-mult", "vision=0.5"],
           "weight_decay": ["--weight-decay", "0.1"], "warmup": ["--warmup", "3"], "grad_clip": ["--grad-clip", "1"],
           "no_amp": ["--no-amp"], "precision": ["--precision", "bf16"], "seed": ["--seed", "5"],
           "tokenizer": ["--tokenizer", "tok"], "scenes_images": ["--scenes-images", "50"],
           "scenes_seed": ["--scenes-seed", "3"], "skip_bad_images": ["--skip-bad-images"],
           "shuffle_buffer": ["--shuffle-buffer", "10"], "steps": ["--steps", "9"], "epochs": ["--epochs", "2"],
           "workers": ["--workers", "1"], "log_every": ["--log-every", "3"], "ckpt_every": ["--ckpt-every", "4"],
           "threads": ["--threads", "2"], "save_total_limit": ["--save-total-limit", "3"],
           "max_image_pixels": ["--max-image-pixels", "1000"], "allow_outside_root": ["--allow-outside-root"],
           "compile": ["--compile"], "grad_checkpointing": ["--grad-checkpointing"],
           "quiet": ["--quiet"], "accept_changed_inputs": ["--accept-changed-inputs"]}
# train flags that set no TrainConfig field of their own: the run directory and mode, the method flags and task
# options (compared field by field), the official-checkpoint conversion (it becomes --init), logging
NOT_FIELDS = {"out", "resume", "overwrite", "loss", DEST, "help", "debug", "verbose", "format", "image_size",
              "init_official", "official_dir", "official_heads", "official_strict", "text_cleaning"} | set(OPTION_FLAGS)


def _args(argv):
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv) if getattr(args, "resume", False) else None
    for k, v in GLOBAL_DEFAULTS.items():
        if not hasattr(args, k):
            setattr(args, k, v)
    return args


@pytest.fixture()
def saved(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = build_config(_args(["train", "pretrain", "--steps", "2", "--out", str(out)]))
    (out / CONFIG_FILE).write_text(__import__("json").dumps(to_dict(cfg)))
    return out, read_train_config(out / CONFIG_FILE)


def test_every_train_flag_is_classified():
    train = next(q for q in _parsers(build_parser()) if q.prog.endswith(" train"))
    dests = {a.dest for a in train._actions if a.option_strings}
    assert dests - NOT_FIELDS == set(FLAG_FIELDS) == set(CHANGED)
    fields = {f for f in TrainConfig.__dataclass_fields__}
    assert set(FLAG_FIELDS.values()) <= fields
    assert set(RESUMABLE_CHANGES) <= set(FLAG_FIELDS.values())  # the CLI can make every change the API allows


@pytest.mark.parametrize("dest", sorted(CHANGED))
def test_cli_and_api_refuse_the_same_changes(saved, dest):
    out, cfg = saved
    argv = ["train", "pretrain", *CHANGED[dest], "--out", str(out), "--resume"]
    field = FLAG_FIELDS[dest]
    fresh = _fresh_config(_args(argv))
    value = getattr(fresh, field)  # what the typed flag sets
    assert value != getattr(cfg, field), dest  # a real change
    change = {"steps": fresh.steps, "epochs": fresh.epochs} if field in ("steps", "epochs") else {field: value}
    api_refuses = bool(resume_differences(cfg, replace(cfg, **change)))
    assert api_refuses == (field not in RESUMABLE_CHANGES)
    if api_refuses:
        with pytest.raises(ValueError, match="cannot resume") as e:
            build_config(_args(argv))
        flag = "--" + dest.replace("_", "-")
        assert f"({flag}: saved {to_dict(cfg)[field]!r}, given {to_dict(replace(cfg, **change))[field]!r})" in str(e.value)
        assert flag not in resumable_flags()
    else:
        new = build_config(_args(argv))
        assert getattr(new, field) == value and resume_differences(cfg, new) == []
        assert "--" + dest.replace("_", "-") in resumable_flags()


def test_the_positional_task_method_and_task_options_follow_the_api_rule(saved):
    out, cfg = saved
    for argv, field in ((["train", "vqa"], "task"), (["train", "pretrain", "--method", "trips"], "method"),
                        (["train", "pretrain", "--loss", "itm=0"], "task_options")):
        args = _args(argv + ["--out", str(out), "--resume"])
        fresh = _fresh_config(args)
        value = fresh.task_options if field != "task_options" else {**cfg.task_options, "itm": 0.0}
        value = getattr(fresh, field) if field != "task_options" else value
        assert resume_differences(cfg, replace(cfg, **{field: value}))
        with pytest.raises(ValueError, match="cannot resume"):
            build_config(args)
    # the same values typed again change nothing
    key, v = next(iter(cfg.task_options.items()))  # the recipe's (mlm=0.3 for `small` from scratch)
    same = build_config(_args(["train", "pretrain", "--steps", "2", "--loss", f"{key}={v}", "--out", str(out),
                               "--resume"]))
    assert resume_differences(cfg, same) == [] and same.task_options == cfg.task_options
