import pytest
import torch

import vlprune
from vlprune.models.heads import add_task_head
from vlprune.tasks.classify import NLVR2Task, VETask, VQATask

from conftest import make_batch


def classify(model, task, images, ids, mask):
    cls = {"vqa": VQATask, "ve": VETask}[task]
    return cls().forward(model, {"images": images, "ids": ids, "mask": mask})[0]


def nlvr2_logits(model, images0, images1, ids, mask):
    pair = torch.stack([images0, images1], dim=1)
    return NLVR2Task().forward(model, {"images": pair, "ids": ids, "mask": mask})[0]


@pytest.mark.parametrize("arch", ["albef", "vilt"])
def test_heads_shapes_and_round_trip(arch, tiny_cfg, tiny_vilt_cfg, tmp_path):
    cfg = tiny_cfg if arch == "albef" else tiny_vilt_cfg
    model = vlprune.build_model(cfg).eval()
    add_task_head(model, "vqa", 7)
    add_task_head(model, "ve")
    add_task_head(model, "nlvr2")
    images, ids, mask = make_batch(cfg)
    assert classify(model, "vqa", images, ids, mask).shape == (3, 7)
    assert classify(model, "ve", images, ids, mask).shape == (3, 3)
    logits = nlvr2_logits(model, images, images.flip(0), ids, mask)
    assert logits.shape == (3, 2)
    vlprune.save_pretrained(model, tmp_path / "m")
    loaded = vlprune.load_pretrained(tmp_path / "m").eval()
    assert torch.equal(nlvr2_logits(loaded, images, images.flip(0), ids, mask), logits)


def test_head_errors(tiny_cfg, batch):
    model = vlprune.build_model(tiny_cfg)
    with pytest.raises(ValueError, match="no 'vqa' head"):
        classify(model, "vqa", *batch)
    with pytest.raises(ValueError, match="needs num_outputs >= 1"):
        add_task_head(model, "vqa")
    with pytest.raises(ValueError, match="unknown task head 'caption'"):
        add_task_head(model, "caption", 3)


@pytest.mark.parametrize("arch", ["albef", "vilt"])
def test_one_multimodal_interface_on_both_families(arch, tiny_cfg, tiny_vilt_cfg):
    cfg = tiny_cfg if arch == "albef" else tiny_vilt_cfg
    torch.manual_seed(0)
    model = vlprune.build_model(cfg, method=vlprune.ReduceConfig("trips", layers=(2,), keep=0.5)).eval()
    images, ids, mask = make_batch(cfg)
    with torch.no_grad():
        enc = model.encode_pair(images, ids, mask)
        shared = model.shared_text(ids, mask)
        again = model.encode_pair(images, ids, mask, text=shared)
        out = model(images, ids, mask)
    assert enc.cls.shape == (3, cfg.width) and torch.equal(enc.cls, again.cls)
    assert enc.image.num_tokens == enc.encoder_tokens.shape[1] < 1 + cfg.vision.num_patches
    want = out.fused[:, 0] if arch == "albef" else out.pooled
    assert torch.equal(enc.cls, want)
    assert (shared is None) == (arch == "vilt")
    assert model.patch_embeddings() is (model.vision.embeddings if arch == "albef" else model.image_embeddings)
    assert model.cross_modal_modules()
