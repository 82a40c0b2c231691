"""``vlprune protocols``: each seed method measured under its own paper's protocol on the demo's text-relevance
benchmark (docs/protocols.md): TRIPS and ELIP reducing during pre-training (the 2x2 of pre-training x fine-tuning
with the method), TiP's two stages on the single-stream model, LAPS on retrieval, DynamicViT with its schedule and
losses; every row of a table at the same training budget, with loss and validation curves and generated verdicts.
"""

from .plan import build_plan
from .profiles import PROFILES, PROTOCOLS, get_profile
from .run import run_protocols

__all__ = ["run_protocols", "build_plan", "PROFILES", "PROTOCOLS", "get_profile"]
