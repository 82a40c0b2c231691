"""The CLI on Hugging Face models: ``vlprune eval vqa --hf DIR`` and ``vlprune bench --hf DIR`` with tiny models and
processors the tests save locally (nothing is downloaded)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import vlprune  # noqa: E402
from vlprune.cli import main  # noqa: E402

import hf_tiny  # noqa: E402


@pytest.mark.parametrize("cls", ["BlipForQuestionAnswering", "ViltForQuestionAnswering"])
def test_eval_vqa_hf_answers_as_the_patched_model_does(tmp_path, capsys, cls):
    import transformers

    build = hf_tiny.blip if cls.startswith("Blip") else hf_tiny.vilt
    d = hf_tiny.save_with_processor(build(cls), tmp_path / "model")
    ann = hf_tiny.vqa_files(tmp_path)
    preds = tmp_path / "preds.json"
    argv = ["eval", "vqa", "--hf", str(d), "--method", "trips", "--layers", "2,3", "--keep", "0.5", "--test", str(ann),
            "--batch-size", "3", "--predictions", str(preds), "--json", "--quiet"]
    torch.manual_seed(0)
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 16 patches -> 10 -> 7 tokens; ViLT keeps the aspect ratio: the 40 x 56 images give 4 x 5 patches -> 12 -> 8
    tokens = 7.0 if cls.startswith("Blip") else (7 + 8) / 2
    assert out["examples"] == 4 and out["method"] == "trips" and out["image_tokens"] == tokens
    assert 0.0 <= out["accuracy"] <= 100.0
    # the same answers from the Python API, question by question
    model = vlprune.patch(getattr(transformers, cls).from_pretrained(d).eval(), "trips", layers=(2, 3), keep=0.5)
    proc = transformers.AutoProcessor.from_pretrained(d)
    from vlprune.data.images import open_image

    want = []
    for e in json.loads(ann.read_text()):
        torch.manual_seed(0)
        inputs = proc(images=[open_image(tmp_path / e["image"])], text=[e["question"]], return_tensors="pt")
        with torch.no_grad():
            if cls.startswith("Vilt"):
                want.append(model.config.id2label[int(model(**inputs).logits.argmax(-1))])
            else:
                want.append(proc.batch_decode(model.generate(**inputs, max_new_tokens=10), skip_special_tokens=True)[0].strip())
    got = [p["answer"] for p in json.loads(preds.read_text())]
    assert got == want


def test_bench_hf_counts_fewer_flops_for_the_patched_rows(tmp_path, capsys):
    d = hf_tiny.save_with_processor(hf_tiny.blip("BlipForImageTextRetrieval"), tmp_path / "m")
    assert main(["bench", "--hf", str(d), "--method", "evit", "--layers", "2", "--keep", "0.5", "--flops-only",
                 "--json", "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["label"] for r in rows] == ["unpatched", "patched none", "evit layers=(2,) keep=0.5"]
    assert rows[0]["gflops"] == pytest.approx(rows[1]["gflops"], rel=1e-6)  # SDPA counts what eager counts
    assert rows[2]["gflops"] < rows[1]["gflops"] and rows[2]["tokens"] == 1 + 8 + 1
    assert rows[2]["ideal_speedup"] == pytest.approx(rows[0]["gflops"] / rows[2]["gflops"])


def test_hf_cli_errors(tmp_path, capsys):
    assert main(["bench", "--hf-arch", "gpt-9"]) == 2
    assert "unknown --hf-arch 'gpt-9'; valid: ['blip-base', 'bridgetower-base', 'clip-b16', 'vilt-b32']" in capsys.readouterr().err
    assert main(["eval", "vqa", "--hf", str(tmp_path / "missing"), "--test", str(tmp_path / "a.json")]) == 2
    assert "not found" in capsys.readouterr().err
    ann = hf_tiny.vqa_files(tmp_path)
    assert main(["eval", "vqa", "--hf", str(tmp_path / "missing"), "--test", str(ann)]) == 2
    assert "--hf " in capsys.readouterr().err
