"""vlprune.viz: patch status from traces (synthetic, a test-only reducer, and every registered method), overlay
PNGs with one panel per reduction, the trade-off plot, the report files, and ``vlprune visualize``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlprune
from vlprune.cli import main
from vlprune.reduce import registry
from vlprune.reduce.state import CLS, FUSED, KEPT, MERGED, LayerTrace
from vlprune.viz import Figure, patch_status, plot_tradeoff, save_overlay, trace_records, write_report
from vlprune.viz.overlay import DROPPED
from vlprune.viz.report import format_cell, markdown_table

from conftest import make_batch
from toy_reducers import install


def _rec(layer, rows, kinds, mask=None):
    src = torch.tensor([rows], dtype=torch.bool)
    kind = torch.tensor([kinds])
    return LayerTrace(layer, "synthetic", len(kinds), src, kind, None if mask is None else torch.tensor([mask]))


def test_patch_status_synthetic_fuse_then_drop():
    # 2x2 patches; layer 2 keeps p1, p3 and fuses p0 + p2; layer 3 keeps only the fused token
    r1 = _rec(2, [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 1, 0, 1, 0]], [CLS, KEPT, KEPT, FUSED])
    r2 = _rec(3, [[1, 0, 0, 0, 0], [0, 1, 0, 1, 0]], [CLS, KEPT])
    p1, p2 = patch_status([("vision", r1), ("vision", r2)])
    assert p1.status.tolist() == [[FUSED, KEPT], [FUSED, KEPT]]
    assert p2.status.tolist() == [[FUSED, DROPPED], [FUSED, DROPPED]]  # a surviving fused token stays "fused"
    assert p2.layer == 3 and p2.tokens == 2 and "dropped 2" in p2.title


def test_patch_status_merged_and_masked():
    r = _rec(1, [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]], [CLS, MERGED, KEPT, KEPT],
             mask=[True, True, True, False])
    (p,) = patch_status([("joint", r)])
    assert p.status.tolist() == [[MERGED, MERGED], [KEPT, DROPPED]]  # a masked-out token covers nothing


def test_patch_status_needs_provenance():
    r = LayerTrace(1, "x", 3, None, None)
    with pytest.raises(ValueError, match="trace=True"):
        patch_status([("vision", r)])


def _check_panels(model, panels, n_records):
    N = model.cfg.vision.num_patches
    assert len(panels) == n_records
    for p in panels:
        assert p.status.shape == (model.cfg.vision.grid,) * 2
        assert set(np.unique(p.status)) <= {KEPT, FUSED, MERGED, DROPPED}
        assert (p.status == KEPT).sum() <= p.tokens - 1 <= N


def test_overlay_from_a_toy_reducer(tmp_path):
    model = install(vlprune.build_model("tiny"), "vision", (2, 4), keep=0.5).eval()
    images, ids, mask = make_batch(model.cfg)
    out = model(images, ids, mask, trace=True)
    recs = trace_records(model, out)
    panels = patch_status(recs, sample=1)
    _check_panels(model, panels, 2)
    assert (panels[0].status == KEPT).sum() == 8 and (panels[0].status == FUSED).sum() == 8
    n = save_overlay(images[1].permute(1, 2, 0).sigmoid(), panels, tmp_path / "o.png", title="toy")
    assert n == 3
    with Image.open(tmp_path / "o.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]  # 3 panels side by side


def test_overlay_grid_wraps_rows(tmp_path):
    model = install(vlprune.build_model("small", use_momentum=False, queue_size=0), "vision", (1, 2, 3, 4, 5), keep=0.8).eval()
    images, ids, mask = make_batch(model.cfg)
    panels = patch_status(trace_records(model, model(images, ids, mask, trace=True)))
    assert save_overlay(np.zeros((64, 64, 3), np.uint8), panels, tmp_path / "o.png", cols=3) == 6
    with Image.open(tmp_path / "o.png") as im:
        w, h = im.size
        assert h > 0.6 * w  # two rows of three panels


def _case(name):
    from method_cases import CASES, model_config, reduce_config

    if name not in CASES:
        pytest.fail(f"{name} has no configuration in tests/method_cases.py (every registered method needs one)")
    return model_config(CASES[name]["model"]), reduce_config(name)


@pytest.mark.parametrize("method", [m for m in vlprune.list_methods() if m != "none"]
                         or [pytest.param("-", marks=pytest.mark.skip("no methods yet"))])
def test_overlay_registered_methods(tmp_path, method):
    cfg, rc = _case(method)
    model = vlprune.build_model(cfg, method=rc).eval()
    images, ids, mask = make_batch(model.cfg)
    recs = trace_records(model, model(images, ids, mask, trace=True))
    panels = patch_status(recs, sample=2)
    _check_panels(model, panels, len(recs))
    assert save_overlay(np.ones((32, 32, 3)), panels, tmp_path / "o.png") == 1 + len(recs)


def test_tradeoff_plot(tmp_path):
    rows = [{"method": "none", "throughput": 10.0, "accuracy": 0.7}, {"method": "trips", "throughput": 14.0, "accuracy": 0.69},
            {"method": "bad", "throughput": None, "accuracy": 0.5}]
    p = plot_tradeoff(rows, tmp_path / "plot.png", title="t")
    with Image.open(p) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="no row has numeric"):
        plot_tradeoff(rows[2:], tmp_path / "none.png")


def test_report_files(tmp_path):
    plot = plot_tradeoff([{"method": "none", "throughput": 1.0, "accuracy": 0.5}], tmp_path / "elsewhere" / "p.png")
    rows = [{"method": "none", "acc": 0.5, "tokens": {"vision": [17, 10]}, "x": None},
            {"method": "a|b", "acc": 0.25, "tokens": {"vision": [17, 17]}, "x": 1.5}]
    cols = [("method", "method", ""), ("acc", "accuracy", ".3f"), ("tokens", "tokens", ""), ("x", "x", ".1f")]
    md, html = write_report(tmp_path / "rep", "Demo <report>", rows, cols, [Figure(plot, "acc vs speed")],
                            notes=["CPU only"], sections=[("Command", "vlprune bench --model tiny")])
    text = md.read_text()
    assert "| method | accuracy | tokens | x |" in text and "| none | 0.500 | vision: 17>10 | n/a |" in text
    assert "a\\|b" in text and "![acc vs speed](figures/p.png)" in text and (tmp_path / "rep/figures/p.png").is_file()
    page = html.read_text()
    assert "<td>0.250</td>" in page and "Demo &lt;report&gt;" in page and 'src="figures/p.png"' in page
    assert "vlprune bench --model tiny" in page
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_report(tmp_path / "r2", "t", rows, figures=[Figure(tmp_path / "missing.png")])


def test_format_cell():
    assert format_cell(None) == "n/a" and format_cell(float("nan"), ".2f") == "n/a"
    assert format_cell(0.12345, ".2f") == "0.12" and format_cell([1, 2]) == "1>2" and format_cell(True, ".2f") == "True"
    assert markdown_table([{"a": 1.0}]).splitlines()[2] == "| 1 |"


# --------------------------------------------------------------------------------------------------------------
# vlprune visualize
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    """A saved tiny model plus a WordPiece tokenizer.json (BERT specials first, so [PAD] = 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path / "run"
    vlprune.save_pretrained(vlprune.build_model("tiny"), d)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordPieceTrainer(vocab_size=80, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tok.train_from_iterator(["a red cube left of a blue ball", "what colour is the ball", "two green cubes"], trainer)
    tok.save(str(d / "tokenizer.json"))
    img = (np.arange(40 * 50 * 3) % 251).astype(np.uint8).reshape(40, 50, 3)
    Image.fromarray(img).save(tmp_path / "img.png")
    return d


def _toy_build(cfg, model, opts):
    install(model, "vision", cfg.layers or (2,), keep=cfg.keep or 0.5)


_toy_builder = registry.MethodSpec("toy", _toy_build, groups=("vision",))


def test_visualize_cli(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(registry._REGISTRY, "toy", _toy_builder)  # restored after the test
    out = tmp_path / "v.png"
    argv = ["visualize", "--checkpoint", str(run_dir), "--image", str(tmp_path / "img.png"), "--text",
            "what colour is the ball", "--method", "toy", "--layers", "2,3", "--keep", "0.5", "--out", str(out)]
    assert main(argv) == 0
    assert "2 reduction layer(s)" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG"
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


@pytest.mark.parametrize("method", [m for m in vlprune.list_methods() if m != "none"]
                         or [pytest.param("-", marks=pytest.mark.skip("no methods yet"))])
def test_visualize_cli_registered_methods(run_dir, tmp_path, method):
    """A checkpoint saved with the method installed (learned methods carry their weights), shown with its
    saved method."""
    import shutil

    cfg, rc = _case(method)
    model = vlprune.build_model(cfg, method=rc)
    if not model.reducers():
        pytest.skip(f"{method} installs no reducer (nothing to overlay)")
    ckpt = vlprune.save_pretrained(model, tmp_path / f"run_{method}")
    shutil.copyfile(run_dir / "tokenizer.json", ckpt / "tokenizer.json")
    argv = ["visualize", "--checkpoint", str(ckpt), "--image", str(tmp_path / "img.png"), "--text", "a red cube",
            "--out", str(tmp_path / "v.png")]
    assert main(argv) == 0
    with Image.open(tmp_path / "v.png") as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("change,match", [
    (dict(image="nope.png"), "image file not found"),
    (dict(text="   "), "empty"),
    (dict(method=None), "no reduction method installed"),
    (dict(out="v.jpg"), "must be a .png"),
    (dict(method="nosuch"), "unknown reduction method 'nosuch'"),
    (dict(tokenizer=False), "tokenizer"),
    (dict(bad_image=True), "not an image file"),
    (dict(bomb=True), "decompression bomb"),
    (dict(max_pixels="10"), "img.png: 50 x 40 = 2,000 pixels, over the limit of 10 (--max-image-pixels)"),
])
def test_visualize_errors(run_dir, tmp_path, monkeypatch, capsys, change, match):
    monkeypatch.setitem(registry._REGISTRY, "toy", _toy_builder)
    if change.get("tokenizer") is False:
        (run_dir / "tokenizer.json").unlink()
    img = tmp_path / "img.png"
    if change.get("bad_image"):
        img = tmp_path / "bad.png"
        img.write_bytes(b"not an image")
    if change.get("bomb"):
        from test_data import _bomb_png

        img = tmp_path / "bomb.png"
        _bomb_png(img)  # a header claiming 20000 x 20000 pixels
    argv = ["visualize", "--checkpoint", str(run_dir), "--image", str(tmp_path / change.get("image", img.name)),
            "--text", change.get("text", "a red cube"), "--out", str(tmp_path / change.get("out", "v.png"))]
    method = change.get("method", "toy")
    if method is not None:
        argv += ["--method", method]
    if "max_pixels" in change:
        argv += ["--max-image-pixels", change["max_pixels"]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_report_of_bench_rows(tmp_path):
    from vlprune.bench.runner import BenchSettings, run_bench
    from vlprune.viz.report import bench_columns

    rows = run_bench(BenchSettings(model="tiny", flops_only=True), [vlprune.ReduceConfig("none")])
    md, _ = write_report(tmp_path, "bench", rows, bench_columns())
    line = [ln for ln in md.read_text().splitlines() if ln.startswith("| none")][0]
    assert "| 17 |" in line and "| n/a |" in line and "| 1.00 |" in line  # tokens, untimed, ideal speed-up


def test_comparison_of_texts_on_one_image(tmp_path):
    from vlprune.viz import save_comparison

    model = install(vlprune.build_model("tiny"), "vision", (2, 3), keep=0.5).eval()
    images, ids, mask = make_batch(model.cfg)
    same = images[:1].expand(3, -1, -1, -1)  # one image, three captions
    panels = [patch_status(trace_records(model, model(same, ids, mask, trace=True)), sample=i) for i in range(3)]
    shape = save_comparison(np.zeros((32, 32, 3)), [(f"q{i}", p) for i, p in enumerate(panels)], tmp_path / "c.png")
    assert shape == (3, 3)
    with Image.open(tmp_path / "c.png") as im:
        assert im.format == "PNG" and im.size[1] > im.size[0] * 0.8
    with pytest.raises(ValueError, match="at least one"):
        save_comparison(np.zeros((32, 32, 3)), [], tmp_path / "e.png")


def test_questions_by_methods_grid(tmp_path):
    """One image, two questions (rows) x two methods (columns), the asked object outlined: the outline's pixels
    are drawn in the figure (lime), and mismatched panels or outlines are refused."""
    from vlprune.reduce.state import KEPT
    from vlprune.reduce.trace import DROPPED, Panel
    from vlprune.viz.overlay import save_question_grid

    status = np.full((4, 4), KEPT)
    status[2:, :] = DROPPED
    p = Panel("vision", 2, "evit", 9, status)
    outline = np.zeros((32, 32), dtype=bool)
    outline[4:12, 4:12] = True
    qs = [("what colour is the square?", outline), ("is there a circle?", None)]
    assert save_question_grid(np.full((32, 32, 3), 0.5), qs, ["evit", "trips"], [[p, p], [p, p]], tmp_path / "g.png") == (2, 3)
    with Image.open(tmp_path / "g.png") as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert ((px[:, 1] > 200) & (px[:, 0] < 100) & (px[:, 2] < 100)).sum() > 50  # the lime outline was drawn
    with pytest.raises(ValueError, match="2 rows of 2"):
        save_question_grid(np.zeros((32, 32, 3)), qs, ["evit", "trips"], [[p], [p]], tmp_path / "e.png")
    with pytest.raises(ValueError, match="does not match the image"):
        save_question_grid(np.zeros((32, 32, 3)), [("q", np.ones((8, 8), bool))], ["evit"], [[p]], tmp_path / "e.png")
    with pytest.raises(ValueError, match="at least one question"):
        save_question_grid(np.zeros((32, 32, 3)), [], ["evit"], [], tmp_path / "e.png")


def test_visualize_a_training_run_directory(run_dir, tmp_path, monkeypatch, capsys):
    """A ``vlprune train`` run directory: weights in run/model, the tokenizer in run/tokenizer."""
    import shutil

    monkeypatch.setitem(registry._REGISTRY, "toy", _toy_builder)
    run = tmp_path / "trainrun"
    shutil.copytree(run_dir, run / "model")
    (run / "tokenizer").mkdir()
    shutil.move(str(run / "model" / "tokenizer.json"), run / "tokenizer" / "tokenizer.json")
    argv = ["visualize", "--checkpoint", str(run), "--image", str(tmp_path / "img.png"), "--text", "a red cube",
            "--method", "toy", "--out", str(tmp_path / "r.png")]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "r.png").is_file()
