import pytest
import torch

import vlprune
from vlprune.tasks.heads import add_task_head, classify, nlvr2_logits

from conftest import make_batch


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
