"""Large-gallery retrieval: the chunked top-k equals a full top-k; the bounded-memory two-stage evaluation gives the
same Recall@K as the in-memory ``evaluate_retrieval`` (with a text-guided method, and with k below 10 so that
ranks beyond the re-ranked candidates count); the rank formula equals ``retrieval_metrics``'s sort."""

from __future__ import annotations

import pytest
import torch

import vlprune
from method_cases import reduce_config
from vlprune.tasks.retrieval import evaluate_retrieval
from vlprune.tasks.retrieval_large import (chunked_topk, evaluate_large_gallery, faiss_available, rank_in_full_matrix,
                                           search)


@pytest.mark.parametrize("chunk,qchunk", [(1, 1), (7, 3), (50, 100), (1000, 2)])
def test_chunked_topk_equals_full_topk(chunk, qchunk):
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(11, 8, generator=g), torch.randn(53, 8, generator=g)
    for k in (1, 5, 53, 80):
        v, i = chunked_topk(q, keys, k, chunk, qchunk)
        rv, ri = (q @ keys.t()).topk(min(k, 53), dim=1)
        # a one-key chunk is a dot product, the full matrix a GEMM: their sums may round differently (a few ulp)
        torch.testing.assert_close(v, rv, rtol=1e-6, atol=1e-5)
        assert torch.equal(i, ri)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_search_equals_torch():
    g = torch.Generator().manual_seed(1)
    q, keys = torch.randn(9, 16, generator=g), torch.randn(200, 16, generator=g)
    assert torch.equal(search(q, keys, 10, backend="faiss")[1], search(q, keys, 10, backend="torch")[1])


def test_rank_formula_equals_the_full_sort():
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        n, k = 12, int(torch.randint(1, 12, (1,), generator=g))
        cand = torch.randperm(n, generator=g)[:k]
        scores = torch.randint(0, 3, (k,), generator=g).float()  # with ties
        row = torch.full((1, n), -100.0)
        row[0, cand] = scores
        for t in range(n):
            order = row[0].argsort(descending=True, stable=True)
            want = int((order == t).nonzero()[0, 0])
            assert rank_in_full_matrix(cand, scores, t) == want


def gallery_case(method=None):
    """(model, images (14, 3, 32, 32), ids, mask, img2txt, txt2img): a tiny model, 14 images, 2 captions each."""
    torch.manual_seed(0)
    model = vlprune.build_model("tiny", method=reduce_config(method) if method else None).eval()
    g = torch.Generator().manual_seed(3)
    n_img, per = 14, 2
    images = torch.randn(n_img, 3, 32, 32, generator=g)
    n_txt = n_img * per
    lengths = torch.randint(3, 9, (n_txt,), generator=g)
    mask = (torch.arange(10)[None] < lengths[:, None]).long()
    ids = torch.randint(5, model.cfg.text.vocab_size, (n_txt, 10), generator=g).masked_fill(mask == 0, 0)
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [t // per for t in range(n_txt)]
    return model, images, ids, mask, img2txt, txt2img


@pytest.mark.parametrize("method,k", [(None, 4), ("trips", 4), (None, 30)])
def test_large_gallery_metrics_equal_the_in_memory_evaluation(method, k):
    model, images, ids, mask, img2txt, txt2img = gallery_case(method)
    n_img, n_txt = images.shape[0], ids.shape[0]
    ref, _ = evaluate_retrieval(model, images, ids, mask, img2txt, txt2img, k=k, batch_size=5)
    loads = []

    def load(rows):
        loads.append(len(rows))
        return images[list(rows)]

    got, cost = evaluate_large_gallery(model, n_img, load, ids, mask, img2txt, txt2img, k=k, batch_size=5, chunk=4,
                                       backend="torch")
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
        assert got[key] == pytest.approx(ref[key]), key
    assert max(loads) <= 5  # images are only ever loaded a batch at a time
    assert cost.itm_pairs == n_txt * min(k, n_img) + n_img * min(k, n_txt)


def test_retrieval_task_gallery_chunk_gives_the_in_memory_metrics(tmp_path):
    """The task's evaluation with ``gallery_chunk`` (``vlprune eval retrieval --gallery-chunk N``) on a scenes test
    file: the same metrics as the in-memory path."""
    from vlprune.data.images import ImageLoader
    from vlprune.data.scenes import generate
    from vlprune.data.tokenizer import TextTokenizer
    from vlprune.tasks.base import get_task

    generate(tmp_path, images=40, seed=1, image_size=32)
    torch.manual_seed(0)
    model = vlprune.build_model("tiny", method=reduce_config("trips")).eval()
    mem, big = get_task("retrieval", k=6), get_task("retrieval", k=6, gallery_chunk=3, search="torch")
    entries = mem.load_test(tmp_path / "retrieval_test.json")
    tok = TextTokenizer.train([c for e in entries for c in e["caption"]], model.cfg.text.vocab_size)
    loader = ImageLoader.for_model(model.cfg.vision, tmp_path)
    a, ia = mem.evaluate_set(model, entries, loader, tok, 4, torch.device("cpu"))
    b, ib = big.evaluate_set(model, entries, loader, tok, 4, torch.device("cpu"))
    assert {k: pytest.approx(v) for k, v in a.items() if k != "itc_r_mean"} == {k: v for k, v in b.items()}
    assert ia["itm_pairs"] == ib["itm_pairs"] and ia["image_tokens"] == ib["image_tokens"]


def test_cli_gallery_chunk_must_not_be_negative(tmp_path, capsys):
    from vlprune.cli import main

    assert main(["eval", "retrieval", "--checkpoint", str(tmp_path), "--gallery-chunk", "-1"]) == 2
    assert "--gallery-chunk must be >= 0, got -1" in capsys.readouterr().err
