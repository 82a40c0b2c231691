"""Open-ended VQA on vision-language LLMs: the VQAv2 answer normalisation on the evaluator's documented cases, the
leave-one-out accuracy on hand-made cases, and ``vlprune eval vqa --hf`` end to end on a tiny LLaVA saved locally
(unpatched and with LVLM methods), with its errors."""

from __future__ import annotations

import json

import pytest
import torch

from vlprune.tasks.vqa_answers import normalize_vqa_answer, vqa_answer_accuracy, vqa_open_accuracy


@pytest.mark.parametrize("raw,norm", [
    ("Yes.", "yes"), ("  two\n", "2"), ("None", "0"), ("ten", "10"),  # case, whitespace, number words
    ("a dog", "dog"), ("The man's hat", "man's hat"), ("an apple", "apple"),  # articles
    ("dont", "don't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"), ("hes", "he's"),  # contractions
    ("1,000", "1000"), ("red, white", "red white"), ("red,white", "red white"),  # comma: glued / touching / inside
    ("3.5", "3.5"), ("st. louis", "st louis"), ("left-hand", "left hand"), ("yes!", "yes"), ("(yes)", "yes"),
    ("t-shirt ?", "t shirt"),  # "?" touches a space: deleted; "-" does not: a space
])
def test_normalisation_follows_the_vqa_evaluator(raw, norm):
    assert normalize_vqa_answer(raw) == norm


def test_accuracy_is_the_leave_one_out_mean_of_min_matches_over_three():
    ten = ["2"] * 3 + ["3"] * 7
    assert vqa_answer_accuracy("two", ten) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_answer_accuracy("3", ten) == 1.0
    assert vqa_answer_accuracy("Yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_answer_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_answer_accuracy("cat", ["dog"] * 10) == 0.0
    assert vqa_answer_accuracy("A dog.", ["dog"]) == 1.0  # a single answer: exact match after normalisation
    assert vqa_open_accuracy(["two", "cat"], [ten, ["dog"] * 10]) == pytest.approx(45.0)
    with pytest.raises(ValueError, match="non-empty list of ground-truth answers"):
        vqa_answer_accuracy("yes", "yes")


pytest.importorskip("transformers")

import hf_tiny  # noqa: E402
import hf_tiny_lvlm as H  # noqa: E402
from vlprune.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_lvlm")
    return H.save_llava_with_processor(root / "llava"), hf_tiny.vqa_files(root), root


def _direct_answers(d, ann, root, method, cls="LlavaForConditionalGeneration"):
    """The answers of the (patched) model question by question through the Python API."""
    import transformers

    import vlprune
    from vlprune.data.images import open_image
    from vlprune.tasks.hf_vqa import lvlm_prompt

    model = getattr(transformers, cls).from_pretrained(d).eval()
    if method is not None:
        vlprune.patch(model, *method[:1], **method[1])
    proc = transformers.AutoProcessor.from_pretrained(d)
    out = []
    for e in json.loads(ann.read_text()):
        x = proc(images=[open_image(root / e["image"])], text=[lvlm_prompt(proc, e["question"])], return_tensors="pt")
        x.pop("token_type_ids", None)  # a BERT tokenizer under transformers 4.x; the LLM takes none
        with torch.no_grad():
            g = model.generate(**x, max_new_tokens=10, do_sample=False)
        out.append(proc.batch_decode(g[:, x["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
    return out


@pytest.mark.parametrize("flags,method,tokens", [
    ([], None, None),
    (["--method", "fastv_llm", "--layers", "1", "--keep", "0.5"], ("fastv_llm", dict(layers=(1,), keep=0.5)), 8),
    (["--method", "sparsevlm", "--layers", "1,2", "--keep", "0.5,0.25"],
     ("sparsevlm", dict(layers=(1, 2), keep=(0.5, 0.25))), 4),
    (["--method", "visionzip", "--keep", "0.5"], ("visionzip", dict(keep=0.5)), 8),
])
def test_eval_vqa_hf_on_a_tiny_llava(saved, capsys, tmp_path, flags, method, tokens):
    d, ann, root = saved
    preds = tmp_path / "preds.json"
    argv = ["eval", "vqa", "--hf", str(d), *flags, "--test", str(ann), "--batch-size", "3", "--predictions",
            str(preds), "--json", "--quiet"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = [p["answer"] for p in json.loads(preds.read_text())]
    assert got == _direct_answers(d, ann, root, method)  # batched, left-padded = one by one
    truth = [e["answer"] for e in json.loads(ann.read_text())]
    assert out["examples"] == 4 and out["accuracy"] == pytest.approx(vqa_open_accuracy(got, truth))
    assert out["image_tokens"] == tokens


@pytest.mark.parametrize("flags,method,tokens,batch", [
    ([], None, None, "3"),  # two image sizes in a batch: the model's own packing
    (["--method", "evit", "--layers", "1", "--keep", "0.5"], ("evit", dict(layers=(1,), keep=0.5)), 27, "1"),
])
def test_eval_vqa_hf_on_a_tiny_llava_next(saved, capsys, tmp_path, flags, method, tokens, batch):
    _, ann, root = saved
    d = H.save_llava_with_processor(tmp_path / "next", next_=True)
    preds = tmp_path / "preds.json"
    assert main(["eval", "vqa", "--hf", str(d), *flags, "--test", str(ann), "--images", str(root), "--batch-size",
                 batch, "--predictions", str(preds), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = [p["answer"] for p in json.loads(preds.read_text())]
    assert got == _direct_answers(d, ann, root, method, "LlavaNextForConditionalGeneration")
    assert out["image_tokens"] == tokens  # 3 crops x (8 kept + 1 fused) per image


def test_eval_vqa_hf_errors(saved, capsys, tmp_path):
    import transformers

    d, ann, root = saved
    bad = tmp_path / "no_answers.json"
    bad.write_text(json.dumps([{k: v for k, v in e.items() if k != "answer"} for e in json.loads(ann.read_text())]))
    assert main(["eval", "vqa", "--hf", str(d), "--test", str(bad), "--images", str(root), "--quiet"]) == 2
    assert 'entry 0 has no "answer" list' in capsys.readouterr().err
    lm = tmp_path / "lm"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in H.LLAMA.items() if k != "model_type"})
                                  ).save_pretrained(lm)
    transformers.AutoProcessor.from_pretrained(d).save_pretrained(lm)
    assert main(["eval", "vqa", "--hf", str(lm), "--test", str(ann), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "needs one of" in err and "LlavaForConditionalGeneration" in err and "LlamaForCausalLM" in err
