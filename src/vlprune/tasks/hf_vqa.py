"""VQA evaluation of a Hugging Face model (``vlprune eval vqa --hf DIR_OR_ID``), optionally patched by
``vlprune.patch``.

The model's own processor (``AutoProcessor``, saved with the model) prepares images and questions, so the model sees
exactly what its authors fed it; images of one batch are resized to one size by that processor. Answers:
``BlipForQuestionAnswering`` generates them (``generate``, greedy, up to ``max_new_tokens``, decoded by the
processor); ``ViltForQuestionAnswering`` classifies (argmax over ``config.id2label``). A patched ViLT takes no image
padding, so a batch whose images the processor padded to one size runs one question at a time. The score is the VQA
accuracy of ``tasks.metrics`` when the annotations have answers. The image tokens reported are those after the
patched encoder (the unpatched model's full count otherwise).

Vision-language LLMs (``LVLM_CLASSES``: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL) answer open-ended: the question goes into
the processor's chat template (a LLaVA-1.5 "USER: <image> ... ASSISTANT:" prompt when it has none) with the
instruction to answer in a single word or phrase, the prompts are left-padded, ``generate`` runs greedy and
batched, and the new tokens are decoded. Their answers are scored as VQAv2 scores them (``tasks.vqa_answers``:
the official normalisation and the leave-one-out accuracy). The image tokens reported for a language-model method
are those its last reducing layer keeps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..data.images import open_image
from ..patch import get_patch
from .metrics import vqa_accuracy
from .vqa_answers import vqa_open_accuracy

LVLM_CLASSES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Qwen2VLForConditionalGeneration")
CLASSES = ("BlipForQuestionAnswering", "ViltForQuestionAnswering") + LVLM_CLASSES
INSTRUCTION = "Answer the question using a single word or phrase."


def load_processor(path_or_id: str) -> Any:
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(path_or_id)
    except (OSError, ValueError, TypeError) as e:
        raise FileNotFoundError(f"--hf {path_or_id}: no processor (tokenizer and image processor) saved with the model "
                                f"({e}); save one with processor.save_pretrained(DIR)") from None


def _answers(model: nn.Module, processor: Any, inputs: Dict[str, Any], max_new_tokens: int) -> Tuple[List[str], List[int]]:
    """The batch's answers and, when patched, the image tokens after the patched encoder per question."""
    pm = inputs.get("pixel_mask")
    if pm is not None and get_patch(model) is not None and not bool(pm.all()) and pm.shape[0] > 1:
        # images of different sizes padded to one: the patched ViLT takes no image padding, so one question at a
        # time (each image then needs no padding; the processor pads at the bottom/right, so cropping to the mask's
        # extent gives exactly the single-image input)
        out: List[str] = []
        tokens: List[int] = []
        for i in range(pm.shape[0]):
            h, w = int(pm[i].any(1).sum()), int(pm[i].any(0).sum())
            one = {k: v[i : i + 1] for k, v in inputs.items()}
            one["pixel_values"], one["pixel_mask"] = one["pixel_values"][..., :h, :w], one["pixel_mask"][..., :h, :w]
            a, t = _answers(model, processor, one, max_new_tokens)
            out, tokens = out + a, tokens + t
        return out, tokens
    if type(model).__name__ in LVLM_CLASSES:
        return _lvlm_answers(model, processor, inputs, max_new_tokens)
    if type(model).__name__ == "ViltForQuestionAnswering":
        idx = model(**inputs).logits.argmax(-1).tolist()
        answers = [model.config.id2label[i] for i in idx]
    else:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens)
        answers = [a.strip() for a in processor.batch_decode(out, skip_special_tokens=True)]
    p = get_patch(model)
    return answers, [p.last_tokens] * len(answers) if p is not None and p.last_tokens is not None else []


def lvlm_prompt(processor: Any, question: str) -> str:
    """The question in the processor's chat template (one image, then the question and the short-answer
    instruction), or LLaVA-1.5's prompt when the processor has no template."""
    text = f"{question.strip()}\n{INSTRUCTION}"
    if getattr(processor, "chat_template", None):
        msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(msg, add_generation_prompt=True)
    return f"USER: <image>\n{text} ASSISTANT:"


def _lvlm_answers(model: nn.Module, processor: Any, inputs: Dict[str, Any], max_new_tokens: int) -> Tuple[List[str], List[int]]:
    """Greedy batched generation; the decoded new tokens; the image tokens the patch kept per question."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    new = out[:, inputs["input_ids"].shape[1]:]
    answers = [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)]
    p = get_patch(model)
    st = getattr(p, "lvlm", None) if p is not None else None
    if st is not None and st.last_kept:
        return answers, st.last_kept[-1][1].sum(1).tolist()
    per_image = getattr(p, "image_tokens", None) or getattr(p, "last_tokens", None)  # LLaVA-NeXT: all its crops
    return answers, [per_image] * len(answers) if per_image is not None else []


def evaluate_vqa(model: nn.Module, processor: Any, entries: Sequence[Dict[str, Any]], image_root: Path,
                 batch_size: int = 32, max_new_tokens: int = 10, progress: bool = True) -> Dict[str, Any]:
    """Answers, accuracy (None without ground truth), examples, mean image tokens and seconds of one pass."""
    from tqdm import tqdm

    name = type(model).__name__
    if name not in CLASSES:
        raise ValueError(f"vlprune eval vqa --hf needs one of {list(CLASSES)}, got {name}")
    lvlm = name in LVLM_CLASSES
    if lvlm:
        processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
    dev = next(model.parameters()).device
    preds: List[str] = []
    tokens: List[int] = []
    t0 = time.perf_counter()
    starts = range(0, len(entries), batch_size)
    for s in tqdm(starts, disable=not progress, desc="eval vqa (hf)", unit="batch", dynamic_ncols=True):
        chunk = entries[s : s + batch_size]
        images = [open_image(image_root / e["image"]) for e in chunk]
        texts = [lvlm_prompt(processor, e["question"]) if lvlm else e["question"] for e in chunk]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(dev) for k, v in inputs.items() if not (lvlm and k == "token_type_ids")}  # LLMs take none
        with torch.inference_mode():
            answers, counts = _answers(model, processor, inputs, max_new_tokens)
        preds += answers
        tokens += counts
    seconds = time.perf_counter() - t0
    answered = [e for e in entries if "answer" in e]
    acc = None
    if len(answered) == len(entries) and entries:
        acc = (vqa_open_accuracy if lvlm else vqa_accuracy)(preds, [e["answer"] for e in entries])
    return {"predictions": preds, "accuracy": acc, "examples": len(entries), "seconds": seconds,
            "image_tokens": sum(tokens) / len(tokens) if tokens else None}


__all__ = ["evaluate_vqa", "load_processor", "lvlm_prompt", "CLASSES", "LVLM_CLASSES"]
