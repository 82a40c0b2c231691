"""Annotation formats, image loading (conversion, bad files, skip mode), datasets + collate, tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlprune.data import formats
from vlprune.data.datasets import CaptionDataset, Collate, NLVR2Dataset, ResumableSampler, VEDataset, VQADataset
from vlprune.data.images import BadImageError, ImageLoader, open_image, pil_to_tensor
from vlprune.data.tokenizer import TextTokenizer

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def write(path, data):
    path.write_text(json.dumps(data))
    return path


GOOD = {
    "pretrain": [{"image": "a.png", "caption": "a red circle"}],
    "retrieval_train": [{"image": "a.png", "caption": "a red circle", "image_id": 3}],
    "retrieval_test": [{"image": "a.png", "caption": ["a red circle", "a circle"]}],
    "vqa": [{"question_id": 1, "image": "a.png", "question": "what colour?", "answer": ["red", "red"]}],
    "nlvr2": [{"images": ["a.png", "b.png"], "sentence": "both red", "label": "True"}],
    "ve": [{"image": "a.png", "sentence": "red", "label": "neutral"}],
}


@pytest.mark.parametrize("kind", list(GOOD))
def test_formats_accept_good_and_name_missing_field(tmp_path, kind):
    good = GOOD[kind]
    assert formats.load_annotations(write(tmp_path / "a.json", good), kind) == good
    for field in good[0]:
        if kind == "vqa" and field == "answer":
            continue  # optional (test files)
        bad = [dict(good[0]), {k: v for k, v in good[0].items() if k != field}]
        p = write(tmp_path / "bad.json", bad)
        with pytest.raises(ValueError, match=rf"bad.json: entry 1 has no field '{field}'"):
            formats.load_annotations(p, kind)


def test_formats_errors(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[{"image": "a.png", "caption": "x"},')
    with pytest.raises(ValueError, match="broken.json: malformed JSON at line 1"):
        formats.load_pretrain(p)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        formats.load_pretrain(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="entry 0 field 'label' must be one of"):
        formats.load_ve(write(tmp_path / "v.json", [{"image": "a", "sentence": "s", "label": "yes"}]))
    with pytest.raises(ValueError, match="entry 0 field 'caption' must be a non-empty string"):
        formats.load_pretrain(write(tmp_path / "c.json", [{"image": "a", "caption": "   "}]))
    with pytest.raises(ValueError, match="expected a JSON list"):
        formats.load_pretrain(write(tmp_path / "d.json", {"image": "a"}))
    with pytest.raises(ValueError, match="entry 0 has no field 'answer'"):
        formats.load_vqa(write(tmp_path / "q.json", [{"question_id": 1, "image": "a", "question": "q"}]), True)
    vqa = formats.load_vqa(write(tmp_path / "q2.json", [{"question_id": 1, "image": "a", "question": "q", "answer": "x"}]))
    assert vqa[0]["answer"] == ["x"]
    with pytest.raises(ValueError, match="answers must be unique"):
        formats.load_answer_list(write(tmp_path / "al.json", ["a", "a"]))


def _png(path, mode, color):
    Image.new(mode, (10, 6), color).save(path)
    return path


@pytest.mark.parametrize(
    "mode,color,fmt,rgb",
    [("L", 128, "png", (128, 128, 128)), ("RGBA", (255, 0, 0, 0), "png", (255, 255, 255)),
     ("RGBA", (10, 20, 30, 255), "png", (10, 20, 30)), ("CMYK", (0, 255, 255, 0), "jpg", (255, 0, 0)),
     ("P", 0, "png", (0, 0, 0)), ("1", 1, "png", (255, 255, 255))],
)
def test_image_modes_become_rgb(tmp_path, mode, color, fmt, rgb):
    p = tmp_path / f"x.{fmt}"
    Image.new(mode, (10, 6), color).save(p)
    img = open_image(p)
    assert img.mode == "RGB" and img.size == (10, 6)
    got = np.asarray(img)[3, 5].astype(int)
    assert np.abs(got - np.array(rgb)).max() <= (3 if fmt == "jpg" else 0)


def test_image_tensor_resize_and_normalise(tmp_path):
    p = _png(tmp_path / "a.png", "RGB", (255, 0, 51))
    x = ImageLoader(tmp_path, 8, MEAN, STD)("a.png")
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    want = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x[:, 4, 4], want)
    # bicubic resize equals PIL's own bicubic resize
    g = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    im = Image.fromarray(g)
    ref = np.asarray(im.resize((8, 8), Image.BICUBIC)).astype(np.float32) / 255
    t = pil_to_tensor(im, 8, (0, 0, 0), (1, 1, 1))
    torch.testing.assert_close(t, torch.from_numpy(ref).permute(2, 0, 1))


def _bad_images(root):
    _png(root / "good.png", "RGB", (1, 2, 3))
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("hello, not an image")
    full = root / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(full)
    (root / "trunc.png").write_bytes(full.read_bytes()[:200])


def test_bad_images_raise_naming_path(tmp_path):
    _bad_images(tmp_path)
    load = ImageLoader(tmp_path, 8, MEAN, STD)
    load("good.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load("missing.png")
    for name, msg in (("empty.png", "empty"), ("text.png", "not an image"), ("trunc.png", "truncated")):
        with pytest.raises(BadImageError, match=f"{msg}.*{name}"):
            load(name)


def _bomb_png(path, width=20000, height=20000):
    """A PNG whose header claims width x height pixels (400 M by default, over PIL's limit): PIL refuses to open it."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_bad_image(tmp_path):
    """Refused from the header by the loader's own limit (PIL's global limit plays no part, either way)."""
    from PIL import Image

    _bomb_png(tmp_path / "bomb.png")
    load = ImageLoader(tmp_path, 8, MEAN, STD)
    with pytest.raises(BadImageError, match="too large.*bomb.png: 20000 x 20000 = 400,000,000 pixels, over the limit "
                       "of 100,000,000"):
        load("bomb.png")
    _png(tmp_path / "small.png", "RGB", (1, 2, 3))  # 10 x 6 = 60 pixels: a bomb under a limit of 59
    assert load("small.png").shape == (3, 8, 8)
    with pytest.raises(BadImageError, match="small.png: 10 x 6 = 60 pixels, over the limit of 59"):
        ImageLoader(tmp_path, 8, MEAN, STD, max_pixels=59)("small.png")
    assert ImageLoader(tmp_path, 8, MEAN, STD, max_pixels=60)("small.png").shape == (3, 8, 8)
    limit = Image.MAX_IMAGE_PIXELS
    ImageLoader(tmp_path, 8, MEAN, STD, max_pixels=60)("small.png")
    assert Image.MAX_IMAGE_PIXELS == limit  # put back after each image
    with pytest.raises(ValueError, match="--max-image-pixels must be an integer >= 1"):
        ImageLoader(tmp_path, 8, MEAN, STD, max_pixels=0)
    entries = [{"image": n, "caption": f"cap {n}"} for n in ("bomb.png", "small.png")]
    ds = CaptionDataset(entries, ImageLoader(tmp_path, 8, MEAN, STD, max_pixels=59), skip_bad_images=True)
    batch = Collate(TextTokenizer.train(["cap a"], 40), 10)([ds[i] for i in range(2)])
    assert batch["skipped"] == 2 and batch["size"] == 0
    with pytest.raises(BadImageError, match=r"bomb.png.*\(annotation entry 0; --skip-bad-images skips"):
        CaptionDataset(entries, load)[0]


def test_image_paths_stay_inside_the_root(tmp_path):
    """../, absolute paths elsewhere and symbolic links in the root that point outside it are refused, naming the
    entry, unless allowed; a path that only passes through .. back into the root and an absolute path inside it
    are fine."""
    from vlprune.data.datasets import check_image_paths
    from vlprune.data.images import ImagePathError

    root, other = tmp_path / "root", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    for d in (root, other):
        _png(d / "a.png", "RGB", (1, 2, 3))
    (root / "link").symlink_to(other, target_is_directory=True)
    load = ImageLoader(root, 8, MEAN, STD)
    for ok in ("a.png", "sub/../a.png", str(root / "a.png")):
        assert load(ok).shape == (3, 8, 8), ok
    for bad in ("../other/a.png", str(other / "a.png"), "sub/../../other/a.png", "link/a.png"):
        with pytest.raises(ImagePathError, match="outside the image root.*--allow-outside-root"):
            load(bad)
        assert ImageLoader(root, 8, MEAN, STD, allow_outside_root=True)(bad).shape == (3, 8, 8)
    entries = [{"image": "a.png", "caption": "x"}, {"images": ["a.png", "../other/a.png"], "sentence": "y"},
               {"image": str(other / "a.png"), "caption": "z"}]
    with pytest.raises(ImagePathError, match=r"annotation entry 1: image path '../other/a.png'.*\(2 entries in all\)"):
        check_image_paths(entries, load)
    check_image_paths(entries, ImageLoader(root, 8, MEAN, STD, allow_outside_root=True))


def test_skip_bad_images_counts(tmp_path):
    _bad_images(tmp_path)
    entries = [{"image": n, "caption": f"cap {n}"} for n in ("good.png", "empty.png", "missing.png", "trunc.png", "good.png")]
    tok = TextTokenizer.train([e["caption"] for e in entries], 40)
    loader = ImageLoader(tmp_path, 8, MEAN, STD)
    with pytest.raises((BadImageError, FileNotFoundError)):
        Collate(tok, 10)([CaptionDataset(entries, loader)[i] for i in range(5)])
    ds = CaptionDataset(entries, loader, skip_bad_images=True)
    batch = Collate(tok, 10)([ds[i] for i in range(5)])
    assert batch["skipped"] == 3 and batch["size"] == 2
    assert batch["images"].shape == (2, 3, 8, 8) and batch["index"].tolist() == [0, 4]
    assert batch["image_id"].tolist() == [0, 0]  # the same image twice -> the same image id


def test_task_datasets(tmp_path):
    _png(tmp_path / "a.png", "RGB", (1, 2, 3))
    _png(tmp_path / "b.png", "L", 7)
    loader = ImageLoader(tmp_path, 8, MEAN, STD)
    tok = TextTokenizer.train(["both red", "what colour", "red"], 40)
    col = Collate(tok, 12)
    b = col([NLVR2Dataset(GOOD["nlvr2"], loader)[0]])
    assert b["images"].shape == (1, 2, 3, 8, 8) and b["label"].tolist() == [1]
    b = col([VEDataset(GOOD["ve"], loader)[0]])
    assert b["label"].tolist() == [1]
    b = col([VQADataset(GOOD["vqa"], loader)[0]])
    assert b["answers"] == [["red", "red"]] and b["question_id"].tolist() == [1]


def test_sampler_resume_position_and_ranks():
    data = list(range(23))
    full = list(ResumableSampler(data, seed=3))
    assert sorted(full) == sorted(data)[: len(full)] or len(set(full)) == len(full)
    s = ResumableSampler(data, seed=3)
    s.set_position(0, 5)
    assert list(s) == full[5:]
    s.set_epoch(1)
    assert list(s) != full[5:]
    r0, r1 = (list(ResumableSampler(data, 2, r, seed=3)) for r in (0, 1))
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 11


def test_tokenizer_round_trip_pad_and_errors(tmp_path, caplog):
    texts = ["a large red circle left of a blue square", "three shapes on a striped background"]
    tok = TextTokenizer.train(texts, 120)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    ids, mask = tok.encode(["a red circle", "three shapes on a striped background"], 40)
    assert ids.shape == mask.shape and ids[0, 0] == tok.cls_id and mask[0].sum() < mask[1].sum()
    n = int(mask[0].sum())
    assert ids[0, n - 1] == tok.sep_id and (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all()
    assert tok.decode(ids[1]) == "three shapes on a striped background"
    tok.save(tmp_path / "tok")
    again = TextTokenizer.from_dir(tmp_path / "tok")
    assert torch.equal(again.encode(["a red circle"], 40)[0], tok.encode(["a red circle"], 40)[0])
    (tmp_path / "tok" / "tokenizer.json").unlink()  # a BERT checkpoint's vocab.txt alone
    v = TextTokenizer.from_dir(tmp_path / "tok")
    assert v.encode(["A RED circle"], 40)[0].tolist() == tok.encode(["a red circle"], 40)[0].tolist()
    for bad in ([""], ["ok", "   "]):
        with pytest.raises(ValueError, match="empty or whitespace"):
            tok.encode(bad, 40)
    with caplog.at_level("WARNING"):
        ids, mask = tok.encode([" ".join(["red"] * 50)], 10)
    assert ids.shape == (1, 10) and ids[0, -1] == tok.sep_id and "truncated" in caplog.text
    import vlprune

    tok.check_model(vlprune.load_preset("small").text)
    with pytest.raises(ValueError, match="vocab_size"):
        tok.check_model(vlprune.TextConfig(vocab_size=10))
