"""Tiny random Hugging Face models for the ``vlprune.patch`` tests (image 32, patch 8 -> 16 patches, width 32, 4 heads,
MLP 37, 4 vision layers); nothing is downloaded."""

from __future__ import annotations

import torch

V = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=8)
T = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
         bos_token_id=1, eos_token_id=2, sep_token_id=2, pad_token_id=0)
B, L, N = 3, 7, 16


def blip(cls_name: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BlipConfig(vision_config=V, text_config=dict(T, max_position_embeddings=64, encoder_hidden_size=32),
                                  projection_dim=32, image_text_hidden_size=32)
    return getattr(transformers, cls_name)(cfg).eval()


def clip(cls_name: str = "CLIPModel", seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(vision_config=V, text_config=dict(T, max_position_embeddings=16), projection_dim=16)
    if cls_name == "CLIPVisionModel":
        return transformers.CLIPVisionModel(cfg.vision_config).eval()
    return transformers.CLIPModel(cfg).eval()


def vilt(cls_name: str = "ViltForQuestionAnswering", seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.ViltConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4,
                                  num_attention_heads=4, image_size=32, patch_size=8, max_position_embeddings=16,
                                  num_labels=5, max_image_length=-1)
    return getattr(transformers, cls_name)(cfg).eval()


def inputs(seed: int = 1):
    """pixel_values (B, 3, 32, 32), input_ids (B, L) ending in eos, attention_mask with padding in sample 1."""
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.randint(5, 99, (B, L), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    ids[1, 3] = 2
    ids[[0, 2], -1] = 2
    return px, ids, mask


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "color", "is", "the", "cube", "red", "blue", "how", "many",
         "two", "yes", "no", "?", "a"]


def save_with_processor(model, directory):
    """Save ``model`` with a tiny processor of its kind (a 19-word BERT vocabulary, 32 px images) to ``directory``."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    import inspect

    params = inspect.signature(transformers.BertTokenizerFast.__init__).parameters  # 5.x: vocab=, 4.x: vocab_file=
    tok = transformers.BertTokenizerFast(**{"vocab" if "vocab" in params else "vocab_file": str(vocab)})
    assert tok("what color")["input_ids"] == [2, 5, 6, 3]
    name = type(model).__name__
    if name.startswith("Blip"):
        proc = transformers.BlipProcessor(transformers.BlipImageProcessor(size={"height": 32, "width": 32}), tok)
    elif name.startswith("CLIP"):
        ip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        proc = transformers.CLIPProcessor(ip, tok)
    else:
        ip = transformers.ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=8)
        proc = transformers.ViltProcessor(ip, tok)
    model.save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory


def vqa_files(root, n: int = 4):
    """n square PNG images and a VQA annotation file under ``root``; returns the annotation path."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        h, w = (40, 40) if i % 2 == 0 else (40, 56)  # two sizes: a ViLT processor pads a batch to one
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        entries.append({"question_id": i, "image": f"img{i}.png", "question": "what color is the cube?" if i % 2 else "how many?",
                        "answer": ["red"] * 10 if i % 2 else ["two"]})
    path = root / "vqa.json"
    path.write_text(json.dumps(entries))
    return path


def bridgetower(cls_name: str = "BridgeTowerForImageAndTextRetrieval", seed: int = 0, text_width: int = 32):
    """4 uni-modal text and vision layers, 3 cross-modal layers (split after layer 2), width 32 (vision 64: its
    attention has width // 64 heads; ``text_width=64`` (text and cross-modal) for ELIP, which mixes the text [CLS]
    into the image [CLS])."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BridgeTowerConfig(
        text_config=dict(vocab_size=99, hidden_size=text_width, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                         max_position_embeddings=64, pad_token_id=0),
        vision_config=dict(hidden_size=64, num_hidden_layers=4, image_size=32, patch_size=8),
        hidden_size=text_width, num_hidden_layers=3, num_attention_heads=4)
    return getattr(transformers, cls_name)(cfg).eval()


def bridgetower_elip(cls_name: str = "BridgeTowerForImageAndTextRetrieval", seed: int = 0):
    """The tiny BridgeTower with text and cross-modal width 64, equal to the vision width (what ELIP needs)."""
    return bridgetower(cls_name, seed, text_width=64)


def retrieval_files(root, n: int = 3):
    """n images with two captions each and a retrieval test file under ``root``; returns its path."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    words = WORDS[5:]
    entries = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"r{i}.png")
        caps = [" ".join(rng.choice(words, size=3 + j)) for j in range(2)]
        entries.append({"image": f"r{i}.png", "caption": caps})
    path = root / "retrieval.json"
    path.write_text(json.dumps(entries))
    return path
