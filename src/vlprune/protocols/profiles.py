"""The numbers of ``vlprune protocols``: one frozen ``ProtocolProfile`` per size.

    quick    the tests' smoke run (tiny model and data, a few steps, one seed): its numbers mean nothing
    default  one seed on the demo's text-relevance benchmark
    full     the same with 3 seeds

The data (scenes settings), the model and the pre-training recipe are not copied here: they are read from the
demo's profiles (``vlprune.demo.profiles``: ``DEFAULT`` for default and full, ``QUICK`` for quick) when a
profile is built, so a change of the demo's recipe reaches the protocols. What is specific to the protocols lives
here: the steps of each fine-tuning stage, TiP's and DynamicViT's keep schedules, LAPS's released-mode warm-up,
the validation checkpoints and the retrieval test gallery's minimum size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Mapping, Tuple

from ..demo import profiles as demo_profiles
from ..demo.profiles import Profile, Recipe

# the protocols, in the order they run (and appear in the report)
PROTOCOLS = ("trips", "elip", "tip", "laps", "dynamicvit")


@dataclass(frozen=True)
class ProtocolProfile:
    name: str
    base: Profile  # the demo profile the scenes, the model and the pre-training recipe come from
    seeds: Tuple[int, ...]
    vqa: Recipe  # every VQA fine-tune (each cell of the TRIPS / ELIP 2x2)
    retrieval: Recipe  # every retrieval fine-tune (the 2x2, the LAPS rows)
    vilt_warmup: Recipe  # the single-stream model's unpruned VQA run from scratch: TiP's teacher and start (every row)
    tip_stage1: int  # TiP stage 1 steps (pruners + head, backbone frozen, continuity weight 0)
    tip_stage2: int  # TiP stage 2 steps (also the joint encoder, continuity weight 1)
    learned_steps: int  # DynamicViT's steps after its warm-up, the unpruned VQA fine-tune (the other rows: the same)
    # the pruning layers of TiP (the single-stream model's joint layers) and of DynamicViT (ViT layers): both keep
    # rho per layer, rho^j cumulative, with rho^len(layers) = the shared keep
    tip_layers: Tuple[int, ...]
    dynamicvit_layers: Tuple[int, ...]
    laps_warm: int  # released mode: steps of hinge summed over all negatives before the hardest-negative steps
    val_images: int  # images of the validation set (its own scenes seed; never the test set)
    val_points: int  # checkpoints of every training stage evaluated on it (the validation curve)
    min_test_images: int  # retrieval test gallery size at least (the scenes' test share grows to reach it)
    retrieval_k: int = 16
    eval_batch: int = 64
    n_boot: int = 2000
    plateau_tol: float = 1.0  # points: the validation metric's best in the last third may gain at most this
    pretrain_options: Mapping[str, Any] = field(default_factory=lambda: {"mlm": 0.3})
    smoke: bool = False

    def __post_init__(self) -> None:
        for k in ("tip_stage1", "tip_stage2", "learned_steps", "val_images", "val_points"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"protocol profile {self.name}: {k} must be an integer >= 1, got {v!r}")
        if not self.seeds:
            raise ValueError(f"protocol profile {self.name}: needs at least one seed")
        if not 0 <= self.laps_warm < self.retrieval.steps:
            raise ValueError(f"protocol profile {self.name}: laps_warm must be in [0, retrieval steps "
                             f"{self.retrieval.steps}), got {self.laps_warm}")
        object.__setattr__(self, "pretrain_options", dict(self.pretrain_options))

    # -- what comes from the demo's profile, by reference -----------------------------------------------------
    @property
    def scenes(self):
        """The demo's scenes, with a test share large enough for ``min_test_images`` retrieval test images."""
        sc = self.base.scenes
        share = max(sc.test_fraction, min(0.5, self.min_test_images / sc.images))
        return replace(sc, test_fraction=round(share + 1e-9, 4)) if share != sc.test_fraction else sc

    @property
    def pretrain(self) -> Recipe:
        """The demo's first-stage recipe (steps, lr, batch) as ITC + ITM + MLM pre-training."""
        r = self.base.pretrain
        if not r.steps:
            raise ValueError(f"protocol profile {self.name}: the demo profile {self.base.name} has no pre-training "
                             "(pretrain steps 0); the protocols need its steps, lr and batch")
        return replace(r, options={**self.pretrain_options, **r.options})

    @property
    def keep(self) -> float:
        """The token budget every pruned row shares: the demo's main keep."""
        return self.base.main_keep

    def model(self, arch: str = "albef") -> Dict[str, Any]:
        """The demo's model overrides; ``vilt``: the same widths and depth as one single-stream encoder."""
        m = dict(self.base.model)
        if arch == "vilt":
            m.update({"arch": "vilt", "fusion_layers": 0, "text.layers": 0})
        return m


QUICK = ProtocolProfile(
    name="quick", base=demo_profiles.QUICK, seeds=(0,),
    vqa=Recipe(steps=4, lr=3e-4, batch_size=8), retrieval=Recipe(steps=4, lr=3e-4, batch_size=8),
    vilt_warmup=Recipe(steps=3, lr=1e-3, batch_size=8), tip_stage1=2, tip_stage2=2, learned_steps=4,
    tip_layers=(1, 2, 3), dynamicvit_layers=(1, 2, 3),
    laps_warm=1, val_images=10, val_points=2, min_test_images=10, retrieval_k=4, eval_batch=32, n_boot=200,
    smoke=True,
)

# One seed on the text-relevance benchmark. Step counts: a first choice, not yet run end to end (the report's
# curves say whether each row levelled off); docs/protocols.md gives the expected budget, from measured rates.
DEFAULT = ProtocolProfile(
    name="default", base=demo_profiles.DEFAULT, seeds=(0,),
    vqa=Recipe(steps=300, lr=3e-4, batch_size=32), retrieval=Recipe(steps=300, lr=3e-4, batch_size=32),
    vilt_warmup=Recipe(steps=500, lr=1e-3, batch_size=32), tip_stage1=100, tip_stage2=200, learned_steps=300,
    tip_layers=(1, 2, 3), dynamicvit_layers=(1, 2, 3),
    laps_warm=50, val_images=100, val_points=5, min_test_images=1000, retrieval_k=8,
)

FULL = replace(DEFAULT, name="full", seeds=(0, 1, 2))

PROFILES: Dict[str, ProtocolProfile] = {p.name: p for p in (QUICK, DEFAULT, FULL)}


def get_profile(name: str) -> ProtocolProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown protocols profile {name!r}; valid profiles: {list(PROFILES)}")
    return PROFILES[name]


def check_protocols(names) -> Tuple[str, ...]:
    """The protocols asked for, in run order; an unknown name raises listing the valid ones."""
    names = tuple(names) or PROTOCOLS
    bad = [n for n in names if n not in PROTOCOLS]
    if bad:
        raise ValueError(f"unknown protocol(s) {bad}; valid protocols: {list(PROTOCOLS)}")
    return tuple(p for p in PROTOCOLS if p in names)


__all__ = ["ProtocolProfile", "PROTOCOLS", "QUICK", "DEFAULT", "FULL", "PROFILES", "get_profile", "check_protocols"]
