"""The demo measures through ``vlprune eval``'s path: on runs trained by the demo's own steps on the quick profile's
data and model, ``demo.steps.eval_vqa`` / ``eval_retrieval`` give the accuracy, per-question scores and predictions
that ``tasks.evaluation.evaluate_run`` and the ``vlprune eval`` command give, for every kind of method the demo
evaluates with (the saved one, none, a ReduceConfig operating point, lowres at an image size)."""

import json
from dataclasses import replace

import pytest

from vlprune.cli import main
from vlprune.config import to_dict
from vlprune.demo import QUICK, steps
from vlprune.demo.profiles import model_config, point
from vlprune.reduce.registry import ReduceConfig
from vlprune.tasks.evaluation import evaluate_run
from vlprune.tasks.metrics import vqa_score
from vlprune.train import TrainConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The quick profile's data, a VQA run and a retrieval run (trained through ``demo.steps.train_run``)."""
    d = tmp_path_factory.mktemp("eval_path")
    cfg = model_config(QUICK)
    data = d / "data"
    steps.make_data(data, QUICK.scenes, cfg.vision.image_size, cfg.text.vocab_size)
    (d / "model.json").write_text(json.dumps(to_dict(cfg)))
    common = dict(images=str(data), model=str(d / "model.json"), tokenizer=str(data / steps.TOKENIZER),
                  batch_size=8, lr=1e-3, threads=1)
    steps.train_run(d / "vqa", TrainConfig(task="vqa", train=str(data / "vqa_train.json"), steps=12,
                                           task_options={"answers": str(data / "answer_list.json")}, **common), False)
    steps.train_run(d / "ret", TrainConfig(task="retrieval", train=str(data / "retrieval_train.json"), steps=4,
                                           **common), False)
    return d, data, cfg


def _flags(rc):
    """``vlprune eval`` method flags of a ReduceConfig (or of "saved" / None)."""
    if rc == "saved":
        return []
    if rc is None:
        return ["--method", "none"]
    out = ["--method", rc.name]
    if rc.layers is not None:
        out += ["--layers", ",".join(map(str, rc.layers))]
    if rc.keep is not None:
        out += ["--keep", ",".join(map(str, rc.keep if isinstance(rc.keep, tuple) else (rc.keep,)))]
    for k, v in rc.options.items():
        out += ["--option", f"{k}={json.dumps(v)}"]
    return out


def _cli(capsys, args):
    capsys.readouterr()
    assert main(["eval"] + args + ["--json", "--quiet", "--threads", "1"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _methods(cfg):
    return {"saved": "saved", "none": None, "trips-0.25": point(QUICK, "trips", 0.25, cfg),
            "tome-0.5": point(QUICK, "tome", 0.5, cfg), "lowres-16px": ReduceConfig("lowres", options={"image_size": 16})}


@pytest.mark.parametrize("name", ["saved", "none", "trips-0.25", "tome-0.5", "lowres-16px"])
def test_demo_vqa_equals_evaluate_run_and_vlprune_eval(runs, tmp_path, capsys, name):
    d, data, cfg = runs
    rc = _methods(cfg)[name]
    demo = steps.eval_vqa(d / "vqa", rc, data, "vqa_test.json", QUICK.eval_batch, False)
    api = evaluate_run(d / "vqa", "vqa", data / "vqa_test.json", method=rc, batch_size=QUICK.eval_batch)
    preds = tmp_path / "preds.json"
    cli = _cli(capsys, ["vqa", "--checkpoint", str(d / "vqa"), "--test", str(data / "vqa_test.json"),
                        "--predictions", str(preds), "--batch-size", str(QUICK.eval_batch)] + _flags(rc))
    if isinstance(rc, ReduceConfig):  # the flags reach the same method
        assert cli["method_config"] == api.method.to_dict() == rc.to_dict()
    records = json.loads(preds.read_text())
    assert demo["predictions"] == api.records() == records
    assert demo["accuracy"] == api.metrics["accuracy"] == cli["accuracy"]
    for key in ("gflops", "image_tokens", "examples"):
        assert demo[key] == api.info[key] == cli[key], key
    # the per-question scores, from the written predictions and the test file's answers (naive reference)
    test = {e["question_id"]: e["answer"] for e in json.loads((data / "vqa_test.json").read_text())}
    naive = [vqa_score(r["answer"], test[r["question_id"]]) for r in records]
    assert demo["scores"] == api.scores() == naive and len(naive) == demo["examples"] == len(test)
    assert demo["accuracy"] == pytest.approx(100 * sum(naive) / len(naive), abs=1e-9)
    if name == "none":
        assert demo["image_tokens"] == (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1
    if name in ("trips-0.25", "lowres-16px"):  # a reduction at inference costs less than none
        full = steps.eval_vqa(d / "vqa", None, data, "vqa_test.json", QUICK.eval_batch, False)
        assert demo["gflops"] < full["gflops"] and demo["image_tokens"] < full["image_tokens"]


def test_demo_blind_vqa_reads_the_blind_test_file(runs, capsys):
    d, data, _ = runs
    demo = steps.eval_vqa(d / "vqa", "saved", data, "vqa_test_blind.json", 7, False)
    cli = _cli(capsys, ["vqa", "--checkpoint", str(d / "vqa"), "--test", str(data / "vqa_test_blind.json"),
                        "--batch-size", "7"])
    assert demo["accuracy"] == cli["accuracy"] and demo["examples"] == cli["examples"]


@pytest.mark.parametrize("limit", [0, 5])
def test_demo_retrieval_equals_vlprune_eval_on_the_first_images(runs, capsys, limit):
    d, data, cfg = runs
    rc = point(QUICK, "evit", 0.5, cfg)
    demo = steps.eval_retrieval(d / "ret", rc, data, QUICK.retrieval_k, QUICK.eval_batch, False, limit)
    entries = json.loads((data / "retrieval_test.json").read_text())
    test = data / f"retrieval_first{limit}.json"  # the naive reference of ``limit``: a file of the first images
    test.write_text(json.dumps(entries[:limit] if limit else entries))
    cli = _cli(capsys, ["retrieval", "--checkpoint", str(d / "ret"), "--test", str(test), "--k",
                        str(QUICK.retrieval_k), "--batch-size", str(QUICK.eval_batch)] + _flags(rc))
    assert demo["images"] == cli["examples"] == (limit or len(entries))
    for key in ("r_mean", "txt_r1", "img_r1", "gflops", "image_tokens", "captions"):
        assert demo[key] == cli[key], key


def test_evaluate_run_limit_is_checked(runs):
    d, data, _ = runs
    with pytest.raises(ValueError, match="limit must be an integer >= 0, got -1"):
        evaluate_run(d / "vqa", "vqa", data / "vqa_test.json", limit=-1)


def test_scores_need_per_example_predictions(runs):
    d, data, _ = runs
    r = evaluate_run(d / "ret", "retrieval", data / "retrieval_test.json", task_options={"k": 2}, limit=3)
    with pytest.raises(ValueError, match="no per-example predictions"):
        r.scores()
    # a label task scores 1.0 per correct label: the mean is the accuracy
    r = replace(r, task=type("T", (), {"name": "ve", "label_of": staticmethod(lambda e: e["y"])})(),
                info={"predictions": [0, 1, 2]}, entries=[{"y": 0}, {"y": 2}, {"y": 2}])
    assert r.scores() == [1.0, 0.0, 1.0]
