"""The demo's recipes: every number the demo uses lives here, in one frozen ``Profile`` per size.

    quick    a smoke run for the tests (tiny model and data, a few steps): its accuracies mean nothing
    default  ``vlprune demo`` / ``make demo``: must fit 20 minutes on 2 idle CPU cores
    full     ``vlprune demo --full``: longer, several seeds for the headline rows

To change the recipe, edit ``QUICK``, ``DEFAULT`` or ``FULL`` below (or build a ``Profile`` with
``dataclasses.replace`` and pass it to ``run_demo``). A stage whose settings change is redone on the next run;
the others are kept.

Operating points: a *keep* ``f`` is the share of image tokens left after the image encoder (about: a fused token
and rounding add one or two). ``point(profile, method, f)`` turns it into a method config on the profile's model:
TRIPS, EViT and random keep ``f ** (1 / len(layers))`` at each of their layers; ToMe merges, at the same layers,
as many tokens as TRIPS removes there (the same token counts); ELIP scales its block ratios so that the last
one is ``f``; lowres shrinks the image to the patch multiple nearest ``sqrt(f)`` of the side.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Mapping, Optional, Tuple

# the methods compared in the sweeps and fine-tuned with reduction (lowres: a sweep of its own, at inference)
METHODS = ("trips", "evit", "tome", "random", "elip")
# the learned methods: fine-tuned in stage 2 with their own losses, distilled from the unpruned run (vqa-none)
LEARNED = ("dynamicvit", "tip")


@dataclass(frozen=True)
class Scenes:
    """``vlprune.data.scenes.generate`` settings."""

    images: int
    image_size: int
    min_objects: int = 3
    max_objects: int = 6
    questions_per_image: int = 4
    test_fraction: float = 0.1
    seed: int = 0
    object_scale: float = 1.0
    question_types: Optional[Tuple[str, ...]] = None  # None = every kind the generator has
    family: str = "shapes"  # "cells": the text-relevance benchmark (vlprune.data.scenes_cells, docs/data.md)
    grid: int = 4  # cells family: cells per side


@dataclass(frozen=True)
class Recipe:
    """One training stage: steps (0 = skip the stage), peak lr, batch, and the task's options (loss weights)."""

    steps: int
    lr: float
    batch_size: int
    options: Mapping[str, Any] = field(default_factory=dict)
    warmup: int = -1  # -1 = 5% of the steps
    lr_mult: Mapping[str, float] = field(default_factory=dict)  # per module group (vlprune.optim), e.g. {"heads": 10}

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"recipe steps must be an integer >= 0, got {self.steps!r}")
        if not self.lr > 0 or self.batch_size < 1:
            raise ValueError(f"recipe needs lr > 0 and batch_size >= 1, got lr={self.lr}, batch_size={self.batch_size}")
        object.__setattr__(self, "options", dict(self.options))
        from ..guards import check_lr_mult
        from ..optim import GROUPS

        unknown = sorted(set(self.lr_mult) - set(GROUPS))
        if unknown:
            raise ValueError(f"recipe lr_mult: unknown module group(s) {unknown}; valid groups: {list(GROUPS)}")
        check_lr_mult(self.lr_mult, "recipe lr_mult")
        object.__setattr__(self, "lr_mult", dict(self.lr_mult))


@dataclass(frozen=True)
class Part:
    """A further part of a VQA first stage, trained from the part before it: ``recipe`` on the questions of ``types``
    (empty: every type), each question of type ``t`` given ``repeat[t]`` times (default 1)."""

    name: str
    recipe: Recipe
    types: Tuple[str, ...] = ()
    repeat: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").isalnum():
            raise ValueError(f"part name must be letters, digits and '_', got {self.name!r}")
        bad = {k: v for k, v in self.repeat.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"part {self.name}: repeat counts must be integers >= 1, got {bad}")
        object.__setattr__(self, "types", tuple(self.types))
        object.__setattr__(self, "repeat", dict(self.repeat))


@dataclass(frozen=True)
class Profile:
    name: str
    scenes: Scenes
    model: Mapping[str, Any]  # overrides of the `small` preset (dotted keys); written to OUT/model.json
    pretrain: Recipe  # steps 0: no pre-training, the fine-tunes start from scratch
    vqa: Recipe
    retrieval: Recipe
    schedules: Mapping[str, Mapping[str, Any]]  # per method: {"layers": (...)} (ELIP also "keep": base ratios)
    sweep: Tuple[float, ...] = (0.9, 0.7, 0.5, 0.35, 0.25)  # keeps at inference, light to aggressive
    main_keep: float = 0.5  # the operating point of the main table and of the fine-tuned-with-method runs
    tuned: Tuple[str, ...] = METHODS  # the methods also fine-tuned with reduction (each one more VQA training run)
    seeds: Tuple[int, ...] = (0,)  # the first seed trains everything; the others only the rows in seed_rows
    seed_rows: Tuple[str, ...] = ("none", "blind")
    retrieval_k: int = 16  # ITM re-ranking candidates (the evaluation's cost grows with k x (images + captions))
    retrieval_images: int = 0  # evaluate retrieval on the first N test images (0 = all)
    retrieval_methods: Tuple[str, ...] = METHODS  # applied at inference to the retrieval model (besides none)
    eval_batch: int = 64
    bench_batch: int = 32
    bench_repeats: int = 3
    bench_text_len: int = 12
    grounding_questions: int = 0  # 0 = every test question with objects
    grounding_sweep: bool = True  # grounding at every sweep point (else the main keep only)
    n_boot: int = 2000
    ckpt_every: int = 100
    smoke: bool = False  # the report says the accuracies are meaningless
    # the first stage's task: "pretrain" (ITC + ITM + MLM on captions) or "vqa" (the unpruned model learns VQA from
    # scratch; the blind row then gets a first stage of its own on the constant image, so that it never sees one)
    pretrain_task: str = "pretrain"
    # a curriculum for a VQA first stage: `warmup.steps` steps from scratch on the questions of `warmup_types` only,
    # then `pretrain` on every question from there (the blind row gets both stages too, on the constant image).
    # Measured need: on the cells benchmark the model learns no question type when all are mixed from the start,
    # and learns the colour question alone (docs/benchmark_scenes.md)
    warmup: Recipe = Recipe(steps=0, lr=1e-3, batch_size=32)
    warmup_types: Tuple[str, ...] = ()
    # further parts after `pretrain`, each from the one before (the blind row gets them too, on the constant image);
    # the stage-2 fine-tunes start from the last. For curricula such as the side-question one of
    # docs/benchmark_scenes.md (side questions alone, then every type with the side ones repeated, at a lower lr)
    first_parts: Tuple[Part, ...] = ()
    # learned methods fine-tuned in stage 2 with their losses and teacher = vqa-none: {name: {"layers", "keep"}}
    learned: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # the keeps whose TRIPS image GFLOPs every method is compared at (those in the sweep; lowres gets an extra
    # evaluation at the image size whose GFLOPs are nearest), and the questions of the side-by-side overlay
    matched_keeps: Tuple[float, ...] = (0.35, 0.25)
    overlay_questions: int = 3
    # captioning (a training stage of its own, from retrieval-none; steps 0 = no captioning rows) and grounding of
    # the scenes' referring expressions (Grad-CAM of retrieval-none's ITM score): the unpruned model, each method at
    # task_keeps, and the blind-captioner / random-box baselines (docs/caption_grounding.md)
    caption: Recipe = Recipe(steps=0, lr=1e-4, batch_size=32)
    caption_images: int = 0  # test images captioned per row (0 = all)
    caption_beams: int = 3  # 1 = greedy
    grounding_expressions: int = -1  # referring expressions per row (0 = all, -1 = no grounding rows)
    grounding_layer: Optional[int] = None  # Grad-CAM fusion layer, 0-based (None: the middle one, as ALBEF)
    task_keeps: Tuple[float, ...] = (0.7, 0.35)
    caption_metric_tokenizer: str = "auto"  # "auto" (PTB when Java is present), "ptb" or "python"
    # "itm": Grad-CAM of retrieval-none's ITM score (ALBEF); "caption": Grad-CAM of the captioner's likelihood of
    # the expression (needs caption.steps > 0). On the cells scenes the demo grounds with ITM: 66% against 9% for a
    # random box, where the captioner's Grad-CAM falls below random (docs/caption_grounding.md)
    grounding_mode: str = "itm"

    def __post_init__(self) -> None:
        bad = [f for f in self.sweep + (self.main_keep,) if not 0 < f <= 1]
        if bad:
            raise ValueError(f"profile {self.name}: keeps must be in (0, 1], got {bad}")
        if self.main_keep not in self.sweep:
            raise ValueError(f"profile {self.name}: main_keep {self.main_keep} must be one of the sweep {self.sweep}")
        missing = [m for m in METHODS if m not in self.schedules]
        if missing:
            raise ValueError(f"profile {self.name}: no schedule for {missing}")
        unknown = [m for m in self.tuned + self.retrieval_methods + tuple(r for r in self.seed_rows if r not in ("none", "blind"))
                   if m not in METHODS]
        if unknown:
            raise ValueError(f"profile {self.name}: unknown method(s) {unknown} in tuned / retrieval_methods / seed_rows; valid: {list(METHODS)}")
        missing_rows = [r for r in self.seed_rows if r not in ("none", "blind") + tuple(self.tuned)]
        if missing_rows:
            raise ValueError(f"profile {self.name}: seed_rows {missing_rows} are not fine-tuned (not in tuned)")
        if not self.seeds:
            raise ValueError(f"profile {self.name}: needs at least one seed")
        bad_learned = [m for m in self.learned if m not in LEARNED]
        if bad_learned:
            raise ValueError(f"profile {self.name}: unknown learned method(s) {bad_learned}; valid: {list(LEARNED)}")
        object.__setattr__(self, "learned", {k: dict(v) for k, v in self.learned.items()})
        if self.pretrain_task not in ("pretrain", "vqa"):
            raise ValueError(f"profile {self.name}: pretrain_task must be 'pretrain' or 'vqa', got {self.pretrain_task!r}")
        if self.warmup.steps:
            from ..data.scenes import question_types_of

            valid = tuple(self.scenes.question_types or question_types_of(self.scenes.family))
            bad_types = [t for t in self.warmup_types if t not in valid]
            if self.pretrain_task != "vqa" or not self.pretrain.steps:
                raise ValueError(f"profile {self.name}: a warm-up stage needs a VQA first stage (pretrain_task 'vqa', "
                                 f"pretrain.steps > 0)")
            if bad_types or not self.warmup_types:
                raise ValueError(f"profile {self.name}: warmup_types must be a non-empty subset of the scenes' "
                                 f"question types {list(valid)}, got {list(self.warmup_types)}")
        if self.first_parts:
            from ..data.scenes import question_types_of

            valid = tuple(self.scenes.question_types or question_types_of(self.scenes.family))
            if self.pretrain_task != "vqa" or not self.pretrain.steps:
                raise ValueError(f"profile {self.name}: first_parts need a VQA first stage (pretrain_task 'vqa', "
                                 f"pretrain.steps > 0)")
            for part in self.first_parts:
                bad_types = [t for t in tuple(part.types) + tuple(part.repeat) if t not in valid]
                if bad_types:
                    raise ValueError(f"profile {self.name}: part {part.name} names question types {bad_types}; "
                                     f"valid: {list(valid)}")
            names = [part.name for part in self.first_parts]
            if len(set(names)) != len(names):
                raise ValueError(f"profile {self.name}: first_parts names must differ, got {names}")
        object.__setattr__(self, "model", dict(self.model))
        object.__setattr__(self, "schedules", {k: dict(v) for k, v in self.schedules.items()})


# The demo's model: the `small` preset at 96 px with 8 px patches (144 patches, so that an aggressive keep rate can
# lose the asked-about object), width 128 and 4 ViT layers: about 3x cheaper per pair than `small`, and it learned
# the demo's questions as fast as a 6-layer one (README, "How the VQA recipe was found").
SCENES_MODEL = {"vision.image_size": 96, "vision.patch_size": 8, "vision.width": 128, "vision.mlp_dim": 512,
                "vision.layers": 4, "text.width": 128, "text.mlp_dim": 512, "embed_dim": 128}
# its schedules: TRIPS / EViT / random / ToMe reduce at layers 2 and 3 of 4, ELIP's blocks start at 2 and 3
SCENES_SCHEDULES = {
    "trips": {"layers": (2, 3)}, "evit": {"layers": (2, 3)}, "random": {"layers": (2, 3)},
    "tome": {"layers": (2, 3)}, "elip": {"layers": (2, 3), "keep": (0.7, 0.5)},
}
# DynamicViT at ViT layers 2 and 3 keeping 0.6 then 0.36 of the patches (about the main keep); TiP in both
# fusion layers, keeping 0.6 of the image tokens the text cross-attends to at each (the image encoder is unpruned)
SCENES_LEARNED = {"dynamicvit": {"layers": (2, 3), "keep": 0.6}, "tip": {"layers": (1, 2), "keep": 0.6}}
# the text-relevance benchmark: 10-13 small objects on a 4 x 4 grid of 24 px cells, their patches about 2.3x what
# keep 0.25 keeps, up to two of them with a fine mark (stripes, checks) that a smaller image loses; colour / exists /
# count / side questions about the marked objects (data.scenes_cells; docs/benchmark_scenes.md)
CELL_SCENES = Scenes(images=6000, image_size=96, min_objects=10, max_objects=13, questions_per_image=4,
                     family="cells", grid=4, test_fraction=0.05)

QUICK = Profile(
    name="quick",
    scenes=Scenes(images=60, image_size=32, min_objects=3, max_objects=4, questions_per_image=3, test_fraction=0.2,
                  family="cells", grid=2),
    model={"vision.image_size": 32, "vision.patch_size": 4, "vision.width": 32, "vision.layers": 4, "vision.heads": 2,
           "vision.mlp_dim": 64, "text.width": 32, "text.layers": 1, "text.heads": 2, "text.mlp_dim": 64,
           "text.vocab_size": 300, "fusion_layers": 1, "embed_dim": 32},
    pretrain=Recipe(steps=4, lr=1e-3, batch_size=8, lr_mult={"heads": 10.0}),  # exercises lr_mult's wiring
    pretrain_task="vqa",
    first_parts=(Part("side", Recipe(steps=2, lr=1e-3, batch_size=8), types=("side",)),
                 Part("mix", Recipe(steps=2, lr=3e-4, batch_size=8), repeat={"side": 3})),
    warmup=Recipe(steps=3, lr=1e-3, batch_size=8), warmup_types=("colour",),
    vqa=Recipe(steps=6, lr=3e-4, batch_size=8),
    retrieval=Recipe(steps=4, lr=3e-4, batch_size=8),
    schedules={"trips": {"layers": (2, 3)}, "evit": {"layers": (2, 3)}, "random": {"layers": (2, 3)},
               "tome": {"layers": (2, 3)}, "elip": {"layers": (2, 3), "keep": (0.7, 0.5)}},
    sweep=(0.9, 0.5, 0.35, 0.25),
    retrieval_k=4, eval_batch=32, bench_batch=4, bench_repeats=1, bench_text_len=8,
    grounding_questions=24, n_boot=500, ckpt_every=1000, smoke=True,
    learned={"dynamicvit": {"layers": (2, 3), "keep": 0.7}, "tip": {"layers": (1,), "keep": 0.6}},
    caption=Recipe(steps=3, lr=1e-3, batch_size=8), caption_images=4, caption_beams=2, grounding_expressions=8,
    task_keeps=(0.5, 0.25), caption_metric_tokenizer="python", grounding_mode="caption",
)

# Stage 1 trains the unpruned model on VQA from scratch (the blind row: on the constant image) in two parts: the
# colour question alone (the warm-up, at lr 5e-4: at 1e-3 one init in three stayed at the prior for 400 of its 500
# steps, docs/benchmark_scenes.md), then every question type; stage 2 fine-tunes it briefly without and with
# each method (the same steps, data order and seed). Measured: 20 minutes or less on 2 idle CPU cores (README).
# A four-part stage 1 that learned the side question at one thread (sine-cosine positions, head lr x10, side
# questions alone, then every type with the side ones 3 times: `first_parts`) did not at two threads in the demo
# and took 20.6 minutes (docs/benchmark_scenes.md), so it is not the default.
DEFAULT = Profile(
    name="default",
    scenes=CELL_SCENES,
    model=SCENES_MODEL,
    warmup=Recipe(steps=500, lr=5e-4, batch_size=32), warmup_types=("colour",),
    pretrain=Recipe(steps=400, lr=1e-3, batch_size=32),
    pretrain_task="vqa",
    vqa=Recipe(steps=60, lr=2e-4, batch_size=32),
    retrieval=Recipe(steps=200, lr=1e-3, batch_size=32),
    schedules=SCENES_SCHEDULES,
    main_keep=0.35,
    learned=SCENES_LEARNED,
    retrieval_k=4, retrieval_images=100, grounding_questions=300,
    caption=Recipe(steps=100, lr=5e-4, batch_size=32), caption_images=100, grounding_expressions=300,
    grounding_mode="itm",
)

FULL = Profile(
    name="full",
    scenes=replace(CELL_SCENES, images=10000, test_fraction=0.1),
    model=SCENES_MODEL,
    warmup=Recipe(steps=800, lr=5e-4, batch_size=32), warmup_types=("colour",),
    pretrain=Recipe(steps=1200, lr=1e-3, batch_size=32),
    pretrain_task="vqa",
    vqa=Recipe(steps=150, lr=2e-4, batch_size=32),
    retrieval=Recipe(steps=300, lr=1e-3, batch_size=32),
    schedules=SCENES_SCHEDULES,
    main_keep=0.35,
    learned=SCENES_LEARNED,
    seeds=(0, 1, 2),
    seed_rows=("none", "blind", "trips", "evit"),
    retrieval_k=8, retrieval_images=200, grounding_questions=600,
    bench_repeats=5,
    caption=Recipe(steps=600, lr=5e-4, batch_size=32), caption_images=300, grounding_expressions=1000,
    grounding_mode="itm",
)

PROFILES: Dict[str, Profile] = {p.name: p for p in (QUICK, DEFAULT, FULL)}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown demo profile {name!r}; valid profiles: {list(PROFILES)}")
    return PROFILES[name]


def model_config(profile: Profile):
    """The profile's ModelConfig: the `small` preset with the profile's overrides."""
    from ..config import load_preset, override

    return override(load_preset("small"), **profile.model)


def point(profile: Profile, method: str, f: float, cfg=None):
    """The ReduceConfig of ``method`` at keep ``f`` on the profile's model (see the module docstring)."""
    from ..reduce.registry import METHODS as REGISTERED

    if method == "none":
        return None
    spec = REGISTERED.get(method) if method in REGISTERED else None
    if spec is None or spec.point is None:
        raise ValueError(f"no operating points for method {method!r}; valid: {list(METHODS) + ['lowres']}")
    cfg = cfg or model_config(profile)
    # the profile's schedule of the method, else the layers and keep its declaration gives (a method without one)
    schedule = profile.schedules.get(method) or {"layers": spec.layers, "keep": spec.keep}
    return spec.point(method, f, schedule, cfg.vision)


def validate(profile: Profile) -> None:
    """Build the profile's model and install every operating point of every method on it, so that a schedule or
    keep the model cannot take fails before anything is trained (the method's own error, naming the point).
    A sweep keep that leaves fewer image tokens than a scene can have objects is refused too."""
    from ..data.scenes_card import check_budget
    from ..models.build import attach, build_model

    cfg = model_config(profile)
    check_budget(profile.scenes.max_objects, cfg.vision.num_patches, min(profile.sweep), f"profile {profile.name}: ")
    model = build_model(cfg)
    for m in list(METHODS) + ["lowres"]:
        for f in profile.sweep:
            rc = point(profile, m, f, cfg)
            try:
                attach(model, rc)
            except ValueError as e:
                raise ValueError(f"profile {profile.name}: {m} at keep {f:g} ({rc.to_dict()}) does not fit the "
                                 f"model: {e}") from None
    attach(model, None)


def label(f: Optional[float]) -> str:
    return "" if f is None else f"k{f:g}"


__all__ = ["Part", "Profile", "Recipe", "Scenes", "QUICK", "DEFAULT", "FULL", "PROFILES", "METHODS", "get_profile",
           "model_config", "point", "label", "validate"]
