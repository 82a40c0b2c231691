"""Tar shards: writing (bad images reported and counted, manifest, checksums, WebDataset-readable), the streaming
reader (same samples as the JSON loader, split over ranks and workers without duplicates or gaps, an order that
does not depend on the number of workers), exact resume (the keys seen across a kill and a resume equal an
uninterrupted run's, per rank; the trainer's model is bitwise the same), and the CLI."""

from __future__ import annotations

import hashlib
import json
import signal
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from vlprune.checkpoint import load_checkpoint
from vlprune.cli import main
from vlprune.data.datasets import CaptionDataset, Collate
from vlprune.data.formats import load_annotations
from vlprune.data.images import ImageLoader
from vlprune.data.scenes import generate
from vlprune.data.shard_dataset import ShardDataset, shard_texts
from vlprune.data.shards import expand_pattern, is_shard_spec, verify_shards, write_shards
from vlprune.data.tokenizer import TextTokenizer

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
BAD = {3: b"not an image at all", 5: b""}  # image number -> bytes written over it


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Scenes (32 px) with two broken images, written into shards of 7 samples."""
    root = tmp_path_factory.mktemp("shards")
    generate(root / "sc", images=24, seed=5, image_size=32)
    for n, b in BAD.items():
        (root / "sc" / "images" / f"{n:06d}.png").write_bytes(b)
    entries = load_annotations(root / "sc" / "pretrain.json", "pretrain")
    reported = []
    m = write_shards(entries, root / "sc", root / "sh", 7, on_bad=lambda i, img, err: reported.append((i, img)))
    return {"root": root, "entries": entries, "manifest": m, "reported": reported,
            "pattern": str(root / "sh" / m["pattern"])}


def _loader():
    return ImageLoader(None, 32, MEAN, STD)


def test_expand_pattern():
    assert expand_pattern("a/{08..11}.tar") == ["a/08.tar", "a/09.tar", "a/10.tar", "a/11.tar"]
    assert expand_pattern("{x,y}/{0..1}.tar") == ["x/0.tar", "x/1.tar", "y/0.tar", "y/1.tar"]
    assert expand_pattern("one.tar") == ["one.tar"]
    for bad in ("{3..1}.tar", "a{.tar", "{}.tar"):
        with pytest.raises(ValueError, match="shard pattern"):
            expand_pattern(bad)
    assert is_shard_spec("s/{000..003}.tar") and not is_shard_spec("pretrain.json") and not is_shard_spec(None)


def test_write_shards_reports_bad_images_and_writes_a_true_manifest(data):
    entries, m, sh = data["entries"], data["manifest"], data["root"] / "sh"
    bad_idx = [i for i, e in enumerate(entries) if any(e["image"].endswith(f"{n:06d}.png") for n in BAD)]
    assert bad_idx and [i for i, _ in data["reported"]] == bad_idx  # every bad entry reported, by index
    assert [b["index"] for b in m["bad"]] == bad_idx and m["skipped"] == len(bad_idx)
    assert m["samples"] + m["skipped"] == m["entries"] == len(entries)  # nothing silently lost
    keys = []
    for s in m["shards"]:
        p = sh / s["name"]
        assert hashlib.sha256(p.read_bytes()).hexdigest() == s["sha256"] and p.stat().st_size == s["bytes"]
        with tarfile.open(p) as tar:
            names = tar.getnames()
        shard_keys = sorted({n.split(".")[0] for n in names})
        assert len(shard_keys) == s["samples"] <= 7 and len(names) == 3 * s["samples"]
        keys += shard_keys
    good = [i for i in range(len(entries)) if i not in bad_idx]
    assert keys == [f"{i:09d}" for i in good]  # unique, in source order
    assert verify_shards(sh) == []
    # byte-identical when rewritten, with images checked in 2 processes too
    again = write_shards(entries, data["root"] / "sc", data["root"] / "sh2", 7, workers=2)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]] and again["bad"] == m["bad"]


def test_webdataset_reads_the_shards(data):
    wds = pytest.importorskip("webdataset")
    got = [(s["__key__"], s["txt"].decode()) for s in wds.WebDataset(data["pattern"], shardshuffle=False)]
    entries = data["entries"]
    assert got == [(k, entries[int(k)]["caption"]) for k, _ in got] and len(got) == data["manifest"]["samples"]


def test_shard_items_equal_the_json_loader(data):
    ds = ShardDataset(data["pattern"], _loader(), batch_size=1, buffer=1)
    ref = CaptionDataset(data["entries"], ImageLoader(data["root"] / "sc", 32, MEAN, STD))
    items = list(ds)
    assert len(items) == data["manifest"]["samples"]
    for it in items[:12]:
        r = ref[it["index"]]
        assert torch.equal(it["image"], r["image"]) and it["text"] == r["text"] and it["image_id"] == r["image_id"]
    assert sorted(shard_texts(data["pattern"])) == sorted(e["caption"] for e in (data["entries"][i["index"]] for i in items))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_header_parser_lists_what_tarfile_lists(tmp_path, fmt):
    """The in-place ustar parser (and its fallback to tarfile for PAX / GNU long names) gives tarfile's members."""
    import io

    from vlprune.data.shard_dataset import _members

    path = tmp_path / "x.tar"
    names = ["a.txt", "d" * 90 + "/k1.jpg", "e" * 120 + "/" + "f" * 30 + ".json", "g.png", "h" * 130 + ".txt"]
    with tarfile.open(path, "w", format=fmt) as tar:
        for j, n in enumerate(names):
            if fmt == tarfile.USTAR_FORMAT and len(n.rsplit("/", 1)[-1]) > 100:
                continue  # ustar cannot store a file name over 100 characters
            info = tarfile.TarInfo(n)
            info.size = 7 * j + 1
            tar.addfile(info, io.BytesIO(bytes(range(info.size))))
    with tarfile.open(path) as tar:
        want = [(m.name, (m.offset_data, m.size)) for m in tar if m.isfile()]
    assert list(_members(str(path))) == want and len(want) >= 4


def test_urls_stream_through_webdataset_gopen(data):
    """A URL (here ``pipe:cat ...``) is opened with webdataset.gopen and streamed (manifest too): the same samples."""
    pytest.importorskip("webdataset")
    sh = data["root"] / "sh"
    url = ShardDataset(f"pipe:cat {sh}/" + data["manifest"]["pattern"], _loader(), 4, seed=3, buffer=5)
    local = ShardDataset(data["pattern"], _loader(), 4, seed=3, buffer=5)
    a, b = list(url), list(local)
    assert [x["key"] for x in a] == [x["key"] for x in b] and len(a) == local.num_samples // 4 * 4
    assert all(torch.equal(x["image"], y["image"]) and x["text"] == y["text"] for x, y in zip(a[:6], b[:6]))


def _keys(ds, epoch=0, skip=0, workers=0, stop=None):
    """Keys of the batches one rank's DataLoader yields, in order (stop after ``stop`` batches)."""
    ds.set_position(epoch, skip)
    tok = TextTokenizer.train(["a red circle"], 30)
    dl = torch.utils.data.DataLoader(ds, batch_size=ds.batch_size, drop_last=True, num_workers=workers,
                                     collate_fn=Collate(tok, 8))
    out = []
    for n, b in enumerate(dl):
        if stop is not None and n == stop:
            break
        out.append(list(b["key"]))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_split_an_epoch_without_duplicates_or_gaps(data, world):
    n = data["manifest"]["samples"]
    per_rank = n // world
    seen = []
    for rank in range(world):
        ds = ShardDataset(data["pattern"], _loader(), 4, rank, world, seed=1, buffer=5)
        assert ds.num_samples == per_rank
        seq = [r.key for r in ds.sequence(0)]
        assert len(seq) == per_rank  # the rank's whole range; batches take the first per_rank // 4 * 4
        seen += seq
    assert len(seen) == len(set(seen)) == world * per_rank  # no duplicates; only the last n % world are left out
    ds0 = ShardDataset(data["pattern"], _loader(), 4, 0, world, seed=1, buffer=5)
    assert [r.key for r in ds0.sequence(0)] != [r.key for r in ds0.sequence(1)]  # each epoch reshuffles


def test_kill_and_resume_see_the_same_samples_per_rank_whatever_the_workers(data):
    world, bs = 2, 4
    for rank in range(world):
        ds = ShardDataset(data["pattern"], _loader(), bs, rank, world, seed=2, buffer=6)
        full = _keys(ds)
        assert len(full) == ds.num_samples // bs and all(len(b) == bs for b in full)
        assert _keys(ds, workers=2) == full  # the order does not depend on the number of workers
        head = _keys(ds, stop=3)
        tail = _keys(ds, skip=3 * bs, workers=2)  # resumed after batch 3, with workers this time
        assert head + tail == full
        assert Counter(k for b in head + tail for k in b) == Counter(k for b in full for k in b)


def test_reader_errors_name_the_problem(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ShardDataset(str(tmp_path / "{0..1}.tar"), _loader(), 2)
    sh = data["root"] / "sh"
    (tmp_path / "000000.tar").write_bytes((sh / "000000.tar").read_bytes())
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardDataset(str(tmp_path / "000000.tar"), _loader(), 2)
    m = json.loads((sh / "manifest.json").read_text())
    m["shards"][0]["samples"] += 2  # the manifest promises more than the shard holds
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    ds = ShardDataset(str(tmp_path / "000000.tar"), _loader(), 2, buffer=1)
    with pytest.raises(ValueError, match="fewer than its manifest"):
        list(ds)
    with pytest.raises(ValueError, match="no full batch"):
        ShardDataset(data["pattern"], _loader(), 1000)


# -- the trainer on shards ----------------------------------------------------------------------------------
MODEL = {"arch": "albef",
         "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 4, "mlp_dim": 37},
         "text": {"vocab_size": 160, "width": 32, "layers": 1, "heads": 4, "mlp_dim": 37, "max_len": 24},
         "fusion_layers": 1, "embed_dim": 16, "queue_size": 16, "use_momentum": True}


def _recording(monkeypatch, seen):
    import vlprune.train as tr
    from vlprune.tasks.base import StepModule

    class Recording(StepModule):
        def forward(self, batch, ctx):
            seen.append(list(batch["key"]))
            return super().forward(batch, ctx)

    monkeypatch.setattr(tr, "StepModule", Recording)


def test_trainer_kill_and_resume_on_shards_is_exact(data, tmp_path, monkeypatch):
    from vlprune.train import TrainConfig, train

    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    torch.set_num_threads(1)
    cfg = TrainConfig(model=str(tmp_path / "model.json"), train=data["pattern"], batch_size=4, steps=5, accum=2,
                      lr=5e-4, log_every=2, ckpt_every=2, seed=1, shuffle_buffer=8)
    full_keys, part_keys = [], []
    _recording(monkeypatch, full_keys)
    train(cfg, tmp_path / "full")
    _recording(monkeypatch, part_keys)

    def kill(step, record):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)

    assert train(cfg, tmp_path / "part", callback=kill)["steps"] == 3
    ck = load_checkpoint(tmp_path / "part")
    assert ck["data"]["kind"] == "shards" and ck["data"]["next_sample"] == 6 * 4  # 3 steps x accum 2 x batch 4
    assert train(cfg, tmp_path / "part", resume=True)["steps"] == 5
    assert len(full_keys) == 10 and part_keys == full_keys  # the same micro-batches, in the same order
    a, b = load_checkpoint(tmp_path / "full")["model"], load_checkpoint(tmp_path / "part")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)  # bitwise


def test_cli_shards_and_train(data, tmp_path, capsys):
    sc = data["root"] / "sc"
    assert main(["data", "shards", "--from", str(sc / "pretrain.json"), "--out", str(tmp_path / "s"),
                 "--shard-size", "10", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert f"skipped {data['manifest']['skipped']} bad image(s)" in out
    first = data["manifest"]["bad"][0]
    assert f"skipping entry {first['index']} ({first['image']})" in err
    assert main(["data", "shards", "--from", str(sc / "pretrain.json"), "--out", str(tmp_path / "s")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["data", "shards", "--from", str(tmp_path / "nope.json"), "--out", str(tmp_path / "t")]) == 2
    assert "nope.json" in capsys.readouterr().err
    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    pattern = str(tmp_path / "s" / "{000000..000003}.tar")
    assert main(["train", "pretrain", "--model", str(tmp_path / "model.json"), "--train", pattern, "--steps", "1",
                 "--batch-size", "4", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert main(["train", "vqa", "--train", pattern, "--steps", "1", "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    assert "tar shards hold image-caption pairs" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    # shards that are not there (or no manifest) are refused before a run directory is made
    (tmp_path / "s" / "manifest.json").rename(tmp_path / "manifest.bak")
    assert main(["train", "pretrain", "--model", str(tmp_path / "model.json"), "--train", pattern, "--steps", "1",
                 "--batch-size", "4", "--out", str(tmp_path / "r3"), "--quiet"]) == 2
    assert "shard manifest not found" in capsys.readouterr().err and not (tmp_path / "r3").exists()


def test_resume_over_other_shards_is_refused(data, tmp_path):
    from dataclasses import replace

    from vlprune.train import TrainConfig, train

    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    sc = data["root"] / "sc"
    m = write_shards(data["entries"], sc, tmp_path / "sh", 7)
    cfg = TrainConfig(model=str(tmp_path / "model.json"), train=str(tmp_path / "sh" / m["pattern"]), batch_size=4,
                      steps=3, log_every=1, ckpt_every=1, seed=1)

    def kill(step, record):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)

    assert train(cfg, tmp_path / "run", callback=kill)["steps"] == 1
    write_shards(data["entries"], sc, tmp_path / "sh", 6)  # the same names now hold other samples
    with pytest.raises(ValueError, match="manifest.json changed since the run started"):  # the run's record
        train(cfg, tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="training shards differ"):  # accepted: the checkpoint's own check
        train(replace(cfg, accept_changed_inputs=True), tmp_path / "run", resume=True)


def test_manifest_for_webdataset_written_shards(tmp_path, capsys):
    """Shards written by webdataset's own TarWriter (no .json, a .txt caption), indexed with `vlprune data
    manifest`, train-ready: the reader gives their samples."""
    wds = pytest.importorskip("webdataset")
    import io

    from PIL import Image

    img = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(img, format="PNG")
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"part-{s}.tar")) as w:
            for j in range(5 + s):
                w.write({"__key__": f"s{s}/x{j}", "png": img.getvalue(), "txt": f"caption {s} {j}"})
    assert main(["data", "manifest", str(tmp_path / "part-{0..1}.tar"), "--quiet"]) == 0
    assert "indexed 11 samples in 2 shard(s)" in capsys.readouterr().out
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["samples"] for s in m["shards"]] == [5, 6] and verify_shards(tmp_path) == []
    items = list(ShardDataset(str(tmp_path / "part-{0..1}.tar"), _loader(), 1, buffer=1))
    assert sorted(i["text"] for i in items) == sorted(f"caption {s} {j}" for s in range(2) for j in range(5 + s))
    assert main(["data", "manifest", str(tmp_path / "part-{0..1}.tar")]) == 2  # exists: not replaced silently
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "manifest", str(tmp_path / "nope-{0..1}.tar")]) == 2
