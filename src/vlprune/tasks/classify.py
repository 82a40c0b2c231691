"""The classification tasks: VQA (over an answer vocabulary, soft-score BCE), SNLI-VE (3-way) and NLVR2 (two
images, each fused with the statement, the two multimodal [CLS] concatenated, true / false).

Each pair is encoded text-guided (the question / statement guides its image's tokens), the head sits on the
multimodal [CLS] (``models.heads``). With a learned method (TiP, DynamicViT) the training loss adds the method's
losses, distilled from ``teacher`` (a run of the same task fine-tuned without pruning): KL of the head's softmax
outputs (for VQA too, over the answer vocabulary), and for DynamicViT also the image-token features.

VQA answer vocabulary: from ``answers`` (an ``answer_list.json``) if given, else the training answers (the most
frequent ``max_answers``); written to ``RUN/answer_vocab.json`` and into the saved model's config.json
(``"answers"``), so that evaluation maps logits back to strings. The loss is ViLT's / ALBEF's
``BCE-with-logits(logits, soft targets) * vocabulary size``; soft targets are min(count / 3, 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.datasets import NLVR2Dataset, VEDataset, VQADataset
from ..data.formats import VE_LABELS, load_annotations, load_answer_list
from ..reduce.state import TokenState
from .base import StepContext, Task, register_task
from ..reduce.registry import get_spec
from .finetune import learned_method, learned_methods, load_teacher, method_losses, set_stage
from ..models.heads import add_recorded_head, add_task_head, task_head
from .metrics import accuracy, build_answer_vocab, normalize_answer, soft_targets, vqa_accuracy


def encode_pairs(model, images: Tensor, ids: Tensor, mask: Tensor, generator=None, text: Optional[Tensor] = None):
    """Text-guided pairs -> (multimodal [CLS] (B, D), final image state (aux of every reduction), image tokens
    after the image encoder (B, T, D)), through the interface both model families share (``encode_pair``)."""
    enc = model.encode_pair(images, ids, mask, generator, text)
    return enc.cls, enc.image, enc.encoder_tokens


class ClassificationTask(Task):
    head = ""
    format = ""
    scenes_test = ""
    text_field = "sentence"  # the entry field holding the text (VQA: "question")
    dataset: type = VEDataset  # the Dataset class of the task's entries

    def __init__(self, teacher: Optional[str] = None, stage: Optional[int] = None, lam: Optional[float] = None,
                 distill: float = 1.0, sparsity: float = 1.0, contrast: float = 1.0, continuity: float = 1.0,
                 ratio: float = 2.0, token_distill: float = 0.5):
        if stage is not None:
            stage = int(stage)
            if stage not in (1, 2):
                raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.teacher_path, self.stage = teacher, stage
        self.lam = float(lam) if lam is not None else (0.0 if stage == 1 else 1.0)
        self.loss_weights = {"distill": distill, "sparsity": sparsity, "contrast": contrast, "continuity": continuity,
                             "ratio": ratio, "token_distill": token_distill}
        self.teacher = None

    # -- data ------------------------------------------------------------------------------------------------
    def load(self, path) -> List[Dict[str, Any]]:
        return load_annotations(path, self.format)

    def texts(self, entries):
        return [e[self.text_field] for e in entries]

    def build_dataset(self, entries, loader, skip_bad_images: bool = False):
        return self.dataset(entries, loader, skip_bad_images)

    def num_outputs(self, entries, out: Path) -> Optional[int]:
        return None

    def prepare(self, model, entries, out, device) -> None:
        if self.head not in model.task_heads:
            add_task_head(model, self.head, self.num_outputs(entries, Path(out)))
        set_stage(model, self.stage)
        if self.teacher_path is not None:
            if learned_method(model) is None:
                raise ValueError(f"--teacher is for the learned methods ({', '.join(learned_methods())}); the model has none")
            self.teacher = load_teacher(self.teacher_path, device)
            if self.head not in self.teacher.task_heads:
                raise ValueError(f"the teacher {self.teacher_path} has no {self.head!r} head (fine-tune it on {self.name} first)")

    def restore(self, meta, model) -> None:
        """A head of another layout in the checkpoint (an official ALBEF / ViLT head) is rebuilt in that layout,
        so that fine-tuning from it continues with its weights."""
        record = (meta.get("heads") or {}).get(self.head)
        if isinstance(record, dict) and self.head not in model.task_heads:
            add_recorded_head(model, self.head, record)

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, model, batch, generator=None) -> Tuple[Tensor, List[TokenState], List[Tensor]]:
        """(logits, image states, image-encoder tokens) of a batch."""
        cls, state, tokens = encode_pairs(model, batch["images"], batch["ids"], batch["mask"], generator)
        return task_head(model, self.head)(cls), [state], [tokens]

    def task_loss(self, logits: Tensor, batch) -> Tensor:
        return F.cross_entropy(logits.float(), batch["label"])

    def step(self, model, batch: Dict[str, Any], ctx: StepContext, update: bool = True) -> Dict[str, Tensor]:
        logits, states, tokens = self.forward(model, batch, ctx.generator)
        loss = self.task_loss(logits, batch)
        name = learned_method(model) if model.training else None
        t_logits = t_tokens = None
        if name is not None and self.teacher is not None:
            with torch.no_grad():
                t_logits, _, t_tokens = self.forward(self.teacher, batch)
        aux = [a for s in states for a in s.aux]
        distill_tokens = name is not None and get_spec(name).distill_tokens
        student = torch.cat([t[:, 1:] for t in tokens]) if distill_tokens and t_tokens is not None else None
        teacher = torch.cat([t[:, 1:] for t in t_tokens]) if student is not None else None
        out = method_losses(model, loss, aux, logits, t_logits, student, teacher, self.lam, self.loss_weights)
        out[self.name] = loss.detach()
        return out

    # -- evaluation ------------------------------------------------------------------------------------------
    def predict(self, model, batch) -> Tuple[List[Any], Tensor]:
        """Predictions (one per sample) and the image tokens after the image encoder per sample (B,)."""
        logits, _, tokens = self.forward(model, batch)
        n = torch.full((logits.shape[0],), float(sum(t.shape[1] for t in tokens)) / len(tokens))
        return logits.argmax(-1).tolist(), n

    def score(self, entries: Sequence[Dict[str, Any]], preds: Sequence[Any]) -> Dict[str, float]:
        target = torch.tensor([self.label_of(e) for e in entries])
        return {"accuracy": accuracy(torch.tensor(list(preds)), target)}

    def prediction_records(self, entries, preds) -> List[Dict[str, Any]]:
        """Per-example predictions in the annotation file's terms (label strings, or VQA answers)."""
        return [{"index": i, "prediction": self.label_name(p)} for i, p in enumerate(preds)]

    def label_name(self, p) -> Any:
        return p

    def label_of(self, e) -> int:  # pragma: no cover - interface
        raise NotImplementedError


@register_task("vqa")
class VQATask(ClassificationTask):
    name = head = "vqa"
    format = "vqa"
    text_field = "question"
    dataset = VQADataset
    scenes_file, scenes_test = "vqa_train.json", "vqa_test.json"

    def __init__(self, answers: Optional[str] = None, max_answers: int = 3129, **kw):
        super().__init__(**kw)
        self.answers_path, self.max_answers = answers, int(max_answers)
        self.vocab: Optional[Dict[str, int]] = None


    def num_outputs(self, entries, out: Path) -> int:
        saved = out / "answer_vocab.json"
        if self.vocab is None and saved.is_file():  # resume
            self.vocab = {a: i for i, a in enumerate(json.loads(saved.read_text()))}
        if self.vocab is None:
            missing = [i for i, e in enumerate(entries) if "answer" not in e]
            if missing:
                raise ValueError(f"VQA training entries need answers; entry {missing[0]} has none")
            if self.answers_path:
                names = dict.fromkeys(n for n in map(normalize_answer, load_answer_list(self.answers_path)) if n)
                self.vocab = {a: i for i, a in enumerate(names)}
            else:
                self.vocab = build_answer_vocab([e["answer"] for e in entries], self.max_answers)
        if out.is_dir():
            saved.write_text(json.dumps(self.answer_list()))
        return len(self.vocab)

    def answer_list(self) -> List[str]:
        return sorted(self.vocab, key=self.vocab.get)

    def save_extra(self) -> Dict[str, Any]:
        return {"answers": self.answer_list()} if self.vocab else {}

    def restore(self, meta, model) -> None:
        super().restore(meta, model)
        if meta.get("answers"):
            self.vocab = {a: i for i, a in enumerate(meta["answers"])}

    def task_loss(self, logits, batch) -> Tensor:
        n = logits.shape[1]
        target = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        for i, answers in enumerate(batch["answers"]):
            for j, s in soft_targets(answers, self.vocab).items():
                target[i, j] = s
        return F.binary_cross_entropy_with_logits(logits.float(), target) * n

    def predict(self, model, batch):
        if self.vocab is None:
            raise ValueError("the checkpoint has no VQA answer vocabulary ('answers' in its config.json)")
        idx, n = super().predict(model, batch)
        names = self.answer_list()
        return [names[i] for i in idx], n

    def prediction_records(self, entries, preds):
        return [{"question_id": e["question_id"], "answer": p} for e, p in zip(entries, preds)]

    def score(self, entries, preds):
        missing = [i for i, e in enumerate(entries) if "answer" not in e]
        if missing:
            raise ValueError(f"cannot score VQA: test entry {missing[0]} has no 'answer' field")
        return {"accuracy": vqa_accuracy(list(preds), [e["answer"] for e in entries])}


@register_task("ve")
class VETask(ClassificationTask):
    name = head = "ve"
    format = "ve"
    dataset = VEDataset
    scenes_file, scenes_test = "ve_train.json", "ve_test.json"

    def label_of(self, e) -> int:
        return VE_LABELS.index(e["label"])

    def label_name(self, p) -> str:
        return VE_LABELS[p]


@register_task("nlvr2")
class NLVR2Task(ClassificationTask):
    name = head = "nlvr2"
    format = "nlvr2"
    dataset = NLVR2Dataset
    scenes_file, scenes_test = "nlvr2_train.json", "nlvr2_test.json"

    def forward(self, model, batch, generator=None):
        """The statement guides and is fused with each image; the two [CLS] are concatenated (``heads``)."""
        ids, mask, pair = batch["ids"], batch["mask"], batch["images"]
        text = model.shared_text(ids, mask)  # the statement is encoded once where the model allows it
        cls, states, tokens = [], [], []
        for j in range(2):
            c, s, t = encode_pairs(model, pair[:, j], ids, mask, generator, text)
            cls.append(c)
            states.append(s)
            tokens.append(t)
        return task_head(model, "nlvr2")(torch.cat(cls, dim=-1)), states, tokens

    def label_of(self, e) -> int:
        return int(e["label"] == "True")

    def label_name(self, p) -> str:
        return "True" if p == 1 else "False"
