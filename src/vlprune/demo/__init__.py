"""The main job on the built-in data: ``vlprune demo`` (``docs/demo.md`` explains the protocol and the report).

    from vlprune.demo import run_demo, QUICK
    run_demo("runs/demo")                      # the default profile; continues an existing run
    run_demo("runs/q", profile="quick")        # the smoke run the tests use

Every recipe number lives in ``vlprune.demo.profiles``.
"""

from .pipeline import run_demo
from .profiles import DEFAULT, FULL, PROFILES, QUICK, Profile, Recipe, Scenes, get_profile

__all__ = ["run_demo", "Profile", "Recipe", "Scenes", "QUICK", "DEFAULT", "FULL", "PROFILES", "get_profile"]
