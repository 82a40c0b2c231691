"""``vlprune eval/train --init-official PATH --format F``: the report table, the metrics, and the errors."""

from __future__ import annotations

import json

import torch

from vlprune.cli import main
from vlprune.data.scenes import generate

from reference.official_fakes import FakeALBEF


def _setup(tmp_path):
    torch.manual_seed(1)
    ckpt = tmp_path / "ve.pth"
    torch.save({"model": FakeALBEF("ve").state_dict(), "config": {"image_res": 32}}, ckpt)
    tok = tmp_path / "tok"
    tok.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(97 + i) for i in range(26)]
    words += [f"##{chr(97 + i)}" for i in range(26)] + [f"w{i}" for i in range(101 - len(words) - 26)]
    (tok / "vocab.txt").write_text("\n".join(words) + "\n")
    data = tmp_path / "data"
    generate(data, images=16, seed=0, image_size=32, test_fraction=0.5)
    return ckpt, tok, data


def test_eval_and_train_from_an_official_checkpoint(tmp_path, capsys):
    ckpt, tok, data = _setup(tmp_path)
    common = ["--init-official", str(ckpt), "--format", "albef", "--official-heads", "4", "--tokenizer", str(tok)]
    assert main(["eval", "ve", "--test", str(data / "ve_test.json"), "--json", "--quiet",
                 "--official-report", str(tmp_path / "rep.json")] + common) == 0
    assert ["task_heads.ve.net.0.weight", "cls_head.0.weight", "copied"] in json.loads((tmp_path / "rep.json").read_text())["loaded"]
    out = capsys.readouterr().out
    assert "albef (ve)" in out and "ignored      cls_head_m.*" in out  # the report table, with the ignored keys
    assert 0.0 <= json.loads(out.strip().splitlines()[-1])["accuracy"] <= 100.0
    run = tmp_path / "run"
    assert main(["train", "ve", "--train", str(data / "ve_train.json"), "--steps", "1", "--batch-size", "2",
                 "--out", str(run), "--quiet"] + common) == 0
    conv = tmp_path / "run-official-init"
    report = json.loads((conv / "official_report.json").read_text())
    assert report["variant"] == "ve" and not report["unknown"] and not report["missing"]
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["init"] == str(conv) and saved["lr"] == 2e-5  # the official fine-tuning rate, not 2e-4
    # the official head's layout (ALBEF's cls_head) carries over into fine-tuning
    assert json.loads((run / "model" / "config.json").read_text())["heads"]["ve"] == {"outputs": 3, "style": "albef"}


def test_official_flag_errors(tmp_path, capsys):
    ckpt, tok, data = _setup(tmp_path)
    base = ["eval", "ve", "--test", str(data / "ve_test.json"), "--init-official", str(ckpt)]
    assert main(base + ["--tokenizer", str(tok)]) == 2
    assert "--init-official needs --format" in capsys.readouterr().err
    assert main(base + ["--format", "albef"]) == 2
    assert "give --tokenizer" in capsys.readouterr().err
    try:
        code = main(base + ["--format", "blip", "--tokenizer", str(tok)])
    except SystemExit as e:  # argparse: invalid choice
        code = e.code
    assert code == 2 and "invalid choice: 'blip'" in capsys.readouterr().err
    assert main(base + ["--format", "laps", "--tokenizer", str(tok)]) == 2
    assert "not a LAPS state dict" in capsys.readouterr().err
