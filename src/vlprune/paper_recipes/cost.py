"""What a recipe stage costs: FLOPs per training sample, and GPU-hours at an assumed utilisation.

How the estimate is made (an estimate, not a measurement):

1. Forward FLOPs of one sample: the analytic count of ``vlprune.bench.flops`` (matrix products only) for the
   stage's model at its image size and method. The image tokens per layer come from a traced run of a *narrow*
   copy of the model (width 4 per head, same depth, patch size, image size and method), which reduces exactly as
   the full-width model does, in milliseconds.
2. Training FLOPs per sample = ``TRAIN_PASSES`` x the forward parts (backward = 2 x forward; the ALBEF objectives
   add fusion passes for ITM negatives and MLM, and a forward of the unpruned momentum encoders).
3. GPU-hours = samples x epochs x training FLOPs / (peak dense bf16 FLOP/s x ``MFU``), with ``MFU = 0.35``
   (an assumption for a base-size model under bf16 autocast; measure yours with scripts/bench_papers.py and pass
   ``--mfu``). Evaluation is not included.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

MFU = 0.35
TEXT_LEN = 30  # tokens per caption / question assumed for the count (ALBEF's are 30-40 at most)
REFERENCE_GPU = "NVIDIA A100"

# dense bf16 tensor-core peak in TFLOP/s (vendor data sheets; V100: fp16), matched by substring of the device name
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0), ("4090", 165.0),
               ("3090", 71.0), ("A6000", 155.0))

# training FLOPs per sample as multiples of forward parts: (whole forward, extra fusion passes, extra text passes,
# extra unpruned image + text forward). fwd + bwd = 3 forwards.
TRAIN_PASSES = {
    "pretrain": (3.0, 3.0 * 2 + 3.0, 3.0, 1.0),  # ITM on 2 negatives + MLM fusion; MLM text; momentum forward
    "retrieval": (3.0, 3.0 * 2, 0.0, 1.0),  # ITM negatives; momentum encoders
    "vqa": (3.0, 0.0, 0.0, 1.0),  # momentum distillation
    "nlvr2": (3.0, 3.0, 0.0, 1.0),  # the second image: another image + fusion pass (counted as fusion + image)
    "ve": (3.0, 0.0, 0.0, 1.0),
}


def peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a GPU by name (None when unknown)."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def narrow_config(cfg):
    """The model's geometry (depth, patch and image size, heads) at width 4 per head: same token counts."""
    from ..config import override

    vh, th = cfg.vision.heads, cfg.text.heads
    w = 4 * max(vh, th)
    return override(cfg, **{"vision.width": w, "vision.heads": max(vh, th), "vision.mlp_dim": 8,
                            "text.width": w, "text.heads": max(vh, th), "text.mlp_dim": 8, "text.vocab_size": 64,
                            "embed_dim": 8, **({"queue_size": 8} if hasattr(cfg, "queue_size") else {})})


_CACHE: Dict[str, Dict[str, int]] = {}


def forward_flops(cfg, method, text_len: int = TEXT_LEN) -> Dict[str, int]:
    """Analytic forward FLOPs of one sample of model ``cfg`` with ``method`` (a ReduceConfig or None), by part;
    plus ``image_full``: the image part without reduction (the momentum encoder's). Memoised per configuration."""
    import json

    from ..config import to_dict

    key = json.dumps([to_dict(cfg), None if method is None else method.to_dict(), text_len], sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = _forward_flops(cfg, method, text_len)
    return dict(_CACHE[key])


def _forward_flops(cfg, method, text_len: int) -> Dict[str, int]:
    import torch

    from ..bench.flops import analytic_flops, layer_tokens
    from ..models.build import build_model

    def counts(m):
        model = build_model(narrow_config(cfg), m).eval()
        g = torch.Generator().manual_seed(0)
        S = cfg.vision.image_size
        images = torch.randn(1, 3, S, S, generator=g)
        ids = torch.randint(2, 64, (1, text_len), generator=g)
        ids[:, 0] = 1
        return layer_tokens(model, images, ids, torch.ones(1, text_len, dtype=torch.long))

    out = analytic_flops(cfg, text_len, counts(method))
    out["image_full"] = analytic_flops(cfg, text_len, counts(None))["image"] if method is not None else out["image"]
    return out


def train_flops_per_sample(task: str, parts: Dict[str, int]) -> float:
    whole, fusion, text, momentum = TRAIN_PASSES[task]
    fus = parts.get("fusion", parts.get("joint", 0))
    img = parts["image"]
    extra_image = img if task == "nlvr2" else 0
    return (whole * parts["total"] + fusion * fus + text * parts.get("text", 0) + 3.0 * extra_image
            + momentum * (parts["image_full"] + parts.get("text", 0)))


def gpu_hours(total_flops: float, peak: float, mfu: float = MFU) -> float:
    return total_flops / (peak * mfu) / 3600.0


def detect_hardware() -> Tuple[str, int, Optional[float]]:
    """(device name, GPU count, peak FLOP/s per GPU); without CUDA: the CPU and no peak."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return name, torch.cuda.device_count(), peak_flops(name)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})", 0, None


def stage_cost(task: str, cfg, method, samples: int, epochs: int, mfu: float = MFU) -> Dict[str, Any]:
    """FLOPs and reference GPU-hours (``REFERENCE_GPU``) of training one stage."""
    parts = forward_flops(cfg, method)
    per = train_flops_per_sample(task, parts)
    total = per * samples * epochs
    return {"forward_gflops": parts["total"] / 1e9, "train_gflops_per_sample": per / 1e9, "total_flops": total,
            "ref_gpu_hours": gpu_hours(total, peak_flops(REFERENCE_GPU), mfu)}


def steps_for(samples: int, epochs: int, batch: int) -> int:
    return max(1, math.floor(samples / batch)) * epochs
