"""``vlprune data prepare``: every target on a tiny fake copy of its release (tests/prepare_fakes.py), the
checks (counts, missing / unreadable images, duplicates), resume, and the errors before any work."""

from __future__ import annotations

import json
import pickle

import pytest

import prepare_fakes as fakes
from vlprune.cli import main
from vlprune.data.formats import load_annotations
from vlprune.prepare import TARGETS, LayoutError, prepare
from vlprune.prepare.refcoco import check_grounding

# target -> {split: entries the fake yields after the checks}
EXPECTED = {
    "coco": {"train": 15, "val": 1, "test": 1}, "flickr30k": {"train": 15, "val": 1, "test": 1},
    "vqav2": {"train": 3, "val": 3, "test": 3, "test-dev": 3}, "vg-qa": {"train": 3}, "vg-captions": {"train": 2},
    "nlvr2": {"train": 3, "dev": 3, "test1": 3}, "snli-ve": {"train": 3, "dev": 3, "test": 3},
    "refcoco+": {"train": 4, "val": 2, "testA": 2, "testB": 2},
    "cc3m": {"train": 3}, "cc12m": {"train": 3}, "sbu": {"train": 3},
}


def _read(path):
    return json.loads(path.read_text())


def test_every_target_has_a_fake_and_a_test():
    assert set(EXPECTED) | {"pretrain-4m", "pretrain-14m"} == set(TARGETS) == set(fakes.BUILDERS) | {
        "pretrain-4m", "pretrain-14m"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_target_on_its_fake_release(tmp_path, name):
    src = tmp_path / "src"
    fakes.build(name, src)
    state = prepare(name, src, tmp_path / "out")
    out = tmp_path / "out" / name
    assert {s: r["entries"] for s, r in state["splits"].items()} == EXPECTED[name]
    for split, rec in state["splits"].items():
        entries = _read(out / rec["file"])
        assert len(entries) == rec["entries"]
        if rec["format"] == "grounding":
            check_grounding(entries, split)
        else:
            load_annotations(out / rec["file"], rec["format"])  # the project's loader reads it
        key = "images" if rec["format"] == "nlvr2" else "image"
        for e in entries:
            for p in (e[key] if key == "images" else [e[key]]):
                assert (src / p).is_file(), p
        assert rec["differs"] is not None  # a fake never has the release's counts
    if TARGETS[name].pretrain:
        m = _read(out / "shards" / "manifest.json")
        assert m["samples"] == state["splits"]["train"]["entries"] and m["skipped"] == 0


def test_karpathy_split_contents(tmp_path):
    info = fakes.build("coco", tmp_path / "coco")
    state = prepare("coco", tmp_path / "coco", tmp_path / "out")
    train = _read(tmp_path / "out" / "coco" / "train.json")
    assert {e["image"].split("/")[0] for e in train} == {"train2014", "val2014"}  # restval joins train
    assert {e["image_id"] for e in train} == {"coco_100", "coco_101", "coco_104"}
    assert state["splits"]["train"]["duplicates"] == info["duplicates"]
    test = _read(tmp_path / "out" / "coco" / "test.json")
    assert len(test) == 1 and len(test[0]["caption"]) == 5
    bad = _read(tmp_path / "out" / "coco" / "test.bad.json")
    assert bad == [{"image": "val2014/COCO_val2014_000000000103.jpg", "error": "missing"}]


def test_vqa_answers_and_answer_list(tmp_path):
    fakes.build("vqav2", tmp_path / "v")
    prepare("vqav2", tmp_path / "v", tmp_path / "out", options={"answers": 1})
    out = tmp_path / "out" / "vqav2"
    train = _read(out / "train.json")
    assert all(len(e["answer"]) == 10 for e in train)
    assert train[0]["image"] == "train2014/COCO_train2014_000000000010.jpg"
    assert _read(out / "answer_list.json") == ["red"]  # 4 x red, 2 x blue over train + val
    assert "answer" not in _read(out / "test.json")[0]


def test_vg_qa_normalises_and_filters_by_answer_list(tmp_path):
    fakes.build("vg-qa", tmp_path / "vg")
    (tmp_path / "answers.json").write_text(json.dumps(["red", "outside"]))
    prepare("vg-qa", tmp_path / "vg", tmp_path / "out", options={"answer_list": str(tmp_path / "answers.json")})
    entries = _read(tmp_path / "out" / "vg-qa" / "train.json")
    assert [(e["answer"], e["image"]) for e in entries] == [(["red"], "VG_100K/1.jpg"),
                                                            (["outside"], "VG_100K_2/2.jpg")]


def test_resume_skips_prepared_splits_and_redoes_changed_sources(tmp_path):
    fakes.build("snli-ve", tmp_path / "s")
    prepare("snli-ve", tmp_path / "s", tmp_path / "out")
    f = tmp_path / "out" / "snli-ve" / "train.json"
    before = f.stat().st_mtime_ns
    lines = []
    prepare("snli-ve", tmp_path / "s", tmp_path / "out", say=lines.append)
    assert f.stat().st_mtime_ns == before and all("already prepared" in s for s in lines)
    src = tmp_path / "s" / "snli_ve_train.jsonl"
    src.write_text(src.read_text().splitlines()[0] + "\n")  # the source changed: train is redone, the rest not
    lines.clear()
    state = prepare("snli-ve", tmp_path / "s", tmp_path / "out", say=lines.append)
    assert state["splits"]["train"]["entries"] == 1
    assert sum("already prepared" in s for s in lines) == 2


def test_decode_check_lists_unreadable_images(tmp_path):
    fakes.build("snli-ve", tmp_path / "s")
    (tmp_path / "s" / "flickr30k-images" / "3001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    state = prepare("snli-ve", tmp_path / "s", tmp_path / "out", splits=["dev"], check="decode")
    assert state["splits"]["dev"]["entries"] == 2
    bad = _read(tmp_path / "out" / "snli-ve" / "dev.bad.json")
    assert [b["image"] for b in bad] == ["flickr30k-images/3001.jpg"] and bad[0]["error"] != "missing"
    state = prepare("snli-ve", tmp_path / "s", tmp_path / "out2", splits=["dev"])  # exists: not decoded
    assert state["splits"]["dev"]["entries"] == 3


def test_wrong_release_and_missing_files_fail_before_any_work(tmp_path):
    fakes.build("flickr30k", tmp_path / "f")
    (tmp_path / "f" / "dataset_flickr30k.json").rename(tmp_path / "f" / "dataset_coco.json")
    for d in ("train2014", "val2014"):
        (tmp_path / "f" / d).mkdir()
    with pytest.raises(LayoutError, match="Karpathy's 'flickr30k' file, not 'coco'"):
        prepare("coco", tmp_path / "f", tmp_path / "out")
    fakes.build("vqav2", tmp_path / "v")
    (tmp_path / "v" / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(LayoutError, match="missing v2_mscoco_val2014_annotations.json"):
        prepare("vqav2", tmp_path / "v", tmp_path / "out")
    assert not (tmp_path / "out" / "vqav2" / "train.json").exists()  # nothing was written
    fakes.build("snli-ve", tmp_path / "s")
    with pytest.raises(LayoutError, match="missing data/train.json"):
        prepare("nlvr2", tmp_path / "s", tmp_path / "out")
    (tmp_path / "s" / "snli_ve_dev.jsonl").write_text(json.dumps({"identifier": "x"}) + "\n")
    with pytest.raises(LayoutError, match="no 'Flickr30K_ID', 'sentence2', 'gold_label' field"):
        prepare("snli-ve", tmp_path / "s", tmp_path / "out", splits=["dev"])
    with pytest.raises(ValueError, match="unknown split"):
        prepare("snli-ve", tmp_path / "s", tmp_path / "out", splits=["val"])


def test_strict_counts_and_pickle_with_code_refused(tmp_path):
    fakes.build("refcoco+", tmp_path / "r")
    with pytest.raises(ValueError, match=r"120,624.*--strict"):
        prepare("refcoco+", tmp_path / "r", tmp_path / "out", strict=True)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "r" / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(LayoutError, match="builtins.print"):
        prepare("refcoco+", tmp_path / "r", tmp_path / "out2")


def test_pretrain_mixture_and_cli(tmp_path, capsys):
    for name in ("coco", "vg-captions", "sbu", "cc3m"):
        fakes.build(name, tmp_path / name)
        assert main(["--quiet", "data", "prepare", name, "--root", str(tmp_path / name), "--out",
                     str(tmp_path / "out")]) == 0
    assert main(["data", "prepare", "pretrain-14m", "--root", str(tmp_path / "out"), "--out",
                 str(tmp_path / "out")]) == 2
    assert "cc12m/prepared.json" in capsys.readouterr().err
    assert main(["--quiet", "data", "prepare", "pretrain-4m", "--root", str(tmp_path / "out"), "--out",
                 str(tmp_path / "out"), "--shard-size", "10"]) == 0
    m = _read(tmp_path / "out" / "pretrain-4m" / "shards" / "manifest.json")
    assert m["samples"] == 15 + 2 + 3 + 3 and [s["samples"] for s in m["shards"]] == [10, 10, 3]
    assert "pretrain-4m" in capsys.readouterr().out
    assert main(["data", "prepare", "vqav2", "--root", str(tmp_path / "coco"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing v2_OpenEnded_mscoco_train2014_questions.json" in err and "Traceback" not in err
    assert main(["data", "prepare", "coco", "--root", str(tmp_path / "coco"), "--out", str(tmp_path / "o"),
                 "--answers", "5"]) == 2
    assert "does not apply to target 'coco'" in capsys.readouterr().err
