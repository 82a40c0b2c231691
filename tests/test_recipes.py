"""Training defaults per preset (vlprune.recipes) and how ``vlprune train`` applies them."""

import pytest

from vlprune.cli import build_parser
from vlprune.commands.train import build_config
from vlprune.recipes import default_lr, default_task_options


def _cfg(tmp_path, *argv):
    args = build_parser().parse_args(["train", *argv, "--out", str(tmp_path / "run")])
    return build_config(args)


@pytest.mark.parametrize("task, model, init, lr", [
    ("pretrain", None, None, 3e-4), ("pretrain", "small", None, 3e-4), ("vqa", "small", None, 1e-3),
    ("retrieval", "tiny", None, 1e-3), ("vqa", None, "runs/pt", 2e-4), ("pretrain", "albef-base", None, 1e-4),
    ("vqa", "albef-base", None, 1e-4), ("pretrain", None, "runs/pt", 1e-4), ("vqa", "my.json", None, 1e-4),
])
def test_default_lr(task, model, init, lr):
    assert default_lr(task, model, init) == lr


def test_official_init_uses_the_official_fine_tuning_rates():
    assert default_lr("retrieval", None, "runs/x", official=True) == 1e-5
    assert default_lr("vqa", None, "runs/x", official=True) == default_lr("ve", None, "runs/x", official=True) == 2e-5


def test_train_command_uses_the_recipe_unless_told(tmp_path):
    cfg = _cfg(tmp_path, "pretrain", "--model", "small")
    assert cfg.lr == 3e-4 and cfg.task_options == {"mlm": 0.3}
    cfg = _cfg(tmp_path, "pretrain", "--model", "small", "--lr", "5e-4", "--loss", "mlm=1,itm=0.5")
    assert cfg.lr == 5e-4 and cfg.task_options == {"mlm": 1.0, "itm": 0.5}
    cfg = _cfg(tmp_path, "pretrain", "--model", "albef-base")
    assert cfg.lr == 1e-4 and cfg.task_options == {}
    cfg = _cfg(tmp_path, "vqa", "--model", "small")
    assert cfg.lr == 1e-3 and "mlm" not in cfg.task_options
    assert default_task_options("vqa", "small", None) == {}
