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


def _spread(model):
    """Matrix weights drawn with std 0.2 so that images and captions change the scores (at the default init they
    barely do)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)


def _pair_reference(entries, root, proc, score):
    """The naive reference: ``score(inputs)`` of each (image, caption) pair processed alone, (images, captions)."""
    from vlprune.data.images import open_image

    caps = [c for e in entries for c in e["caption"]]
    pair = torch.zeros(len(entries), len(caps))
    with torch.no_grad():
        for i, e in enumerate(entries):
            for t, c in enumerate(caps):
                torch.manual_seed(0)  # ViLT samples its patch order with the global generator
                pair[i, t] = score(proc(images=[open_image(root / e["image"])], text=[c], return_tensors="pt"))
    return pair


def test_eval_retrieval_hf_reranks_every_pair_with_the_patched_itm_head(tmp_path, capsys):
    """With k >= the number of candidates every pair is re-ranked, so the scores are the patched model's ITM match
    probabilities of all pairs (computed here pair by pair) and the recalls are theirs. The weights are drawn with
    std 0.2 so that images and captions change the scores (at the default init they barely do)."""
    import transformers

    from vlprune.tasks.hf_retrieval import evaluate_blip_retrieval
    from vlprune.tasks.metrics import retrieval_metrics

    model = hf_tiny.blip("BlipForImageTextRetrieval")
    _spread(model)
    d = hf_tiny.save_with_processor(model, tmp_path / "m")
    ann = hf_tiny.retrieval_files(tmp_path)
    argv = ["eval", "retrieval", "--hf", str(d), "--method", "trips", "--layers", "2,3", "--keep", "0.5",
            "--test", str(ann), "--k", "16", "--batch-size", "4", "--json", "--quiet"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = vlprune.patch(transformers.BlipForImageTextRetrieval.from_pretrained(d).eval(), "trips", layers=(2, 3), keep=0.5)
    proc = transformers.AutoProcessor.from_pretrained(d)
    entries = json.loads(ann.read_text())
    res = evaluate_blip_retrieval(model, proc, entries, tmp_path, k=16, batch_size=4, progress=False)
    caps = [c for e in entries for c in e["caption"]]
    pair = _pair_reference(entries, tmp_path, proc, lambda x: model(**x).itm_score.softmax(-1)[0, 1])
    torch.testing.assert_close(res["scores_i2t"], pair, atol=1e-5, rtol=0)
    torch.testing.assert_close(res["scores_t2i"], pair, atol=1e-5, rtol=0)
    for m in (pair, pair.t()):  # no near-ties within a row: the recalls below are not decided by rounding
        v = m.sort(dim=1).values
        assert float((v[:, 1:] - v[:, :-1]).min()) > 1e-4
    want = retrieval_metrics(pair, [[2 * i, 2 * i + 1] for i in range(len(entries))], [t // 2 for t in range(len(caps))])
    assert got["images"] == 3 and got["captions"] == 6 and got["method"] == "trips"
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5"):
        assert got[key] == pytest.approx(want[key])


def test_eval_retrieval_hf_clip_ranks_by_the_patched_itc_similarity(tmp_path, capsys):
    """CLIP: ITC ranking with an image-only method; the scores equal the patched model's own forward
    (``logits_per_image`` / logit scale) pair by pair, the recalls follow; a text-guided method is refused."""
    import transformers

    from vlprune.tasks.metrics import retrieval_metrics

    model = hf_tiny.clip("CLIPModel")
    _spread(model)
    d = hf_tiny.save_with_processor(model, tmp_path / "m")
    ann = hf_tiny.retrieval_files(tmp_path)
    argv = ["eval", "retrieval", "--hf", str(d), "--method", "evit", "--layers", "2", "--keep", "0.5",
            "--test", str(ann), "--batch-size", "2", "--json", "--quiet"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = vlprune.patch(transformers.CLIPModel.from_pretrained(d).eval(), "evit", layers=(2,), keep=0.5)
    proc = transformers.AutoProcessor.from_pretrained(d)
    entries = json.loads(ann.read_text())
    caps = [c for e in entries for c in e["caption"]]

    def itc(x):
        out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], pixel_values=x["pixel_values"])
        return out.logits_per_image[0, 0] / model.logit_scale.exp()

    pair = _pair_reference(entries, tmp_path, proc, itc)
    from vlprune.tasks.hf_retrieval import evaluate_clip_retrieval

    res = evaluate_clip_retrieval(model, proc, entries, tmp_path, batch_size=2, progress=False)
    torch.testing.assert_close(res["scores"], pair, atol=1e-5, rtol=0)
    v = pair.sort(dim=1).values
    assert float((v[:, 1:] - v[:, :-1]).min()) > 1e-4  # no near-ties: the recalls are not decided by rounding
    want = retrieval_metrics(pair, [[2 * i, 2 * i + 1] for i in range(len(entries))], [t // 2 for t in range(len(caps))])
    assert got["images"] == 3 and got["captions"] == 6 and got["method"] == "evit"
    assert got["image_tokens"] == 1 + 8 + 1
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        assert got[key] == pytest.approx(want[key])
    assert main(argv[:4] + ["--method", "trips", "--test", str(ann), "--quiet"]) == 2
    assert "text-guided" in capsys.readouterr().err


@pytest.mark.parametrize("build,cls,method", [
    (hf_tiny.vilt, "ViltForImageAndTextRetrieval", ["trips", "--layers", "2,3", "--keep", "0.5"]),
    (hf_tiny.bridgetower_elip, "BridgeTowerForImageAndTextRetrieval", ["trips", "--layers", "2,3", "--keep", "0.5"]),
    (hf_tiny.bridgetower, "BridgeTowerForImageAndTextRetrieval", ["tip", "--layers", "1,2", "--keep", "0.5"]),
], ids=["vilt-trips", "bridgetower-trips", "bridgetower-tip"])
def test_eval_retrieval_hf_scores_every_pair_with_the_patched_retrieval_head(tmp_path, capsys, build, cls, method):
    """ViLT and BridgeTower (no text-free first stage): every image-caption pair is scored, batched, by the patched
    model's own retrieval logit; the scores equal its forward on each pair alone (a text-guided method guided by
    that pair's caption), the recalls follow from them; more pairs than --max-pairs are refused."""
    import transformers

    from vlprune.tasks.hf_retrieval import evaluate_pair_retrieval

    model = build(cls)
    _spread(model)
    d = hf_tiny.save_with_processor(model, tmp_path / "m")
    ann = hf_tiny.retrieval_files(tmp_path)
    argv = ["eval", "retrieval", "--hf", str(d), "--method", *method, "--test", str(ann), "--batch-size", "4", "--json"]
    torch.manual_seed(0)
    assert main(argv) == 0
    out = capsys.readouterr()
    got = json.loads(out.out.strip().splitlines()[-1])
    assert "3 x 6 = 18 image-caption pairs" in out.out and "pair" in out.err  # the count, then the progress bar
    layers = tuple(int(x) for x in method[2].split(","))
    torch.manual_seed(0)  # TiP's pruner starts from random weights: the same as the CLI's
    model = vlprune.patch(getattr(transformers, cls).from_pretrained(d).eval(), method[0], layers=layers, keep=0.5)
    proc = transformers.AutoProcessor.from_pretrained(d)
    entries = json.loads(ann.read_text())
    pair = _pair_reference(entries, tmp_path, proc, lambda x: model(**x).logits[0, 0 if cls.startswith("Vilt") else 1])
    torch.manual_seed(0)
    res = evaluate_pair_retrieval(model, proc, entries, tmp_path, batch_size=4, progress=False)
    torch.testing.assert_close(res["scores"], pair, atol=1e-5, rtol=0)
    for m in (pair, pair.t()):  # no near-ties within a row: the recalls below are not decided by rounding
        v = m.sort(dim=1).values
        assert float((v[:, 1:] - v[:, :-1]).min()) > 1e-4
    # naive recalls: the rank of the best true caption of each image, of the true image of each caption
    recall = {}
    for k in (1, 5, 10):
        recall[f"txt_r{k}"] = 100 * sum(min(int((pair[i] > pair[i, t]).sum()) for t in (2 * i, 2 * i + 1)) < k
                                        for i in range(3)) / 3
        recall[f"img_r{k}"] = 100 * sum(int((pair[:, t] > pair[t // 2, t]).sum()) < k for t in range(6)) / 6
    recall["r_mean"] = sum(recall.values()) / 6
    assert got["images"] == 3 and got["captions"] == 6 and got["pairs"] == 18 and got["method"] == method[0]
    for key, want in recall.items():
        assert got[key] == pytest.approx(want)
    assert main(argv[:-1] + ["--max-pairs", "17"]) == 2
    err = capsys.readouterr().err
    assert "3 images x 6 captions = 18 pairs" in err and "--max-pairs 17" in err
