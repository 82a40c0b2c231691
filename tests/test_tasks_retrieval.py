import pytest
import torch

import vlprune
from vlprune.tasks.metrics import retrieval_metrics
from vlprune.tasks.retrieval import evaluate_retrieval, reducers_disabled

from conftest import make_batch


def _data(cfg, n_img=4, per=2):
    images = torch.randn(n_img, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    _, ids, mask = make_batch(cfg, seed=4, lengths=[3 + (i % 5) for i in range(n_img * per)])
    img2txt = [[per * i + j for j in range(per)] for i in range(n_img)]
    txt2img = [i for i in range(n_img) for _ in range(per)]
    return images, ids, mask, img2txt, txt2img


def test_full_rerank_equals_naive_itm_matrix(tiny_cfg):
    model = vlprune.build_model(tiny_cfg).eval()
    images, ids, mask, img2txt, txt2img = _data(tiny_cfg)
    metrics, cost = evaluate_retrieval(model, images, ids, mask, img2txt, txt2img, k=100, batch_size=3)
    n_img, n_txt = images.shape[0], ids.shape[0]
    naive = torch.empty(n_img, n_txt)
    with torch.no_grad():
        for i in range(n_img):
            for t in range(n_txt):
                naive[i, t] = model(images[i : i + 1], ids[t : t + 1], mask[t : t + 1]).itm_logits[0, 1]
    ref = retrieval_metrics(naive, img2txt, txt2img)
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        assert metrics[key] == pytest.approx(ref[key]), key
    assert cost.itm_pairs == 2 * n_img * n_txt


def test_k_limits_itm_pairs_and_stage_one_is_text_free(tiny_cfg):
    model = vlprune.build_model(tiny_cfg).eval()
    images, ids, mask, img2txt, txt2img = _data(tiny_cfg)
    _, cost = evaluate_retrieval(model, images, ids, mask, img2txt, txt2img, k=2)
    assert cost.itm_pairs == 2 * images.shape[0] + 2 * ids.shape[0]
    with pytest.raises(ValueError, match="k .* must be >= 1"):
        evaluate_retrieval(model, images, ids, mask, img2txt, txt2img, k=0)


def test_reducers_disabled_restores(tiny_cfg):
    model = vlprune.build_model(tiny_cfg)
    sentinel = torch.nn.Identity()
    model.vision.layers[1].reducer = sentinel
    with reducers_disabled(model):
        assert model.vision.layers[1].reducer is None
    assert model.vision.layers[1].reducer is sentinel
