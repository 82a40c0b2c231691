"""Method declarations: options with types and ranges, traits read by the tasks, the order of list_methods()."""

import pytest

import vlprune
from vlprune import ReduceConfig as RC
from vlprune.objectives import method_losses as method_objectives
from vlprune.reduce import registry
from vlprune.reduce.registry import MethodSpec, Option, get_spec
from vlprune.tasks.finetune import learned_method, learned_methods
from vlprune.tasks.retrieval import is_text_guided


def test_builtin_order_and_none_first():
    names = vlprune.list_methods()
    assert names[0] == "none"
    assert names[:10] == ["none", "trips", "elip", "tip", "laps", "evit", "tome", "dynamicvit", "random", "lowres"]
    assert "fastv" in names[10:]  # registered outside vlprune (tests/fastv_example.py): after the built-in ones


def test_registry_idiom():
    from vlprune.registry import Registry

    r = Registry("widget")
    r.register("a", 1)

    @r.register("b")
    def b():
        return 2

    assert r.names() == ["a", "b"] and r.get("b") is b and "a" in r and len(r) == 2
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        r.register("a", 3)
    with pytest.raises(ValueError, match="^unknown widget 'c'; valid: a, b$"):
        r.get("c")
    assert r.find(lambda item: item if item == 1 else None) == 1 and r.find(lambda item: None) is None
    with pytest.raises(ValueError, match="^unknown reduction method 'nope'; valid: none, trips, elip"):
        get_spec("nope")
    with pytest.raises(ValueError, match="reduction method 'trips' is already registered"):
        registry.register("trips")(lambda cfg, model, opts: None)


def test_a_new_method_appears_everywhere_from_its_module(capsys):
    """tests/fastv_example.py is one module (plus its case in method_cases.py) and nothing else names it; it is in
    `vlprune info` and its methods table, in vlprune.patch where its traits fit (ViLT's joint slots, with a text
    guide) and nowhere else, in the benchmark's method list and in the demo's operating points."""
    import torch

    import hf_tiny
    from vlprune.cli import main
    from vlprune.commands.info import methods_table
    from vlprune.demo.profiles import QUICK, point
    from vlprune.reduce.registry import ReduceConfig

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fastv" in out.splitlines()[1] and "  fastv: fusion/joint slots, mid; text-guided" in out
    assert "| fastv | FastV (example) | fusion, joint | mid | yes | no | yes | vilt |" in methods_table().splitlines()
    supported = vlprune.patch.supported_classes()
    assert [c for c, methods in supported.items() if "fastv" in methods] == [
        "ViltForQuestionAnswering", "ViltForImageAndTextRetrieval", "ViltForMaskedLM", "ViltModel"]
    model = hf_tiny.vilt()
    px, ids, mask = hf_tiny.inputs()
    pixel_mask = torch.ones(px.shape[0], 32, 32, dtype=torch.long)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=px, pixel_mask=pixel_mask).logits
        vlprune.patch(model, "fastv", layers=(2,), keep=0.5)
        model(input_ids=ids, attention_mask=mask, pixel_values=px, pixel_mask=pixel_mask)
        assert vlprune.patch.get_patch(model).last_tokens == 1 + 8  # [CLS] + half of the 16 patches
        vlprune.patch(model, "fastv", layers=(2,), keep=1.0)
        same = model(input_ids=ids, attention_mask=mask, pixel_values=px, pixel_mask=pixel_mask).logits
    torch.testing.assert_close(same, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'fastv' is not supported on CLIPModel: it runs in 'fusion' or 'joint' slots"):
        vlprune.patch(hf_tiny.clip(), "fastv")
    from test_bench import _check_counted_vs_analytic, _method_model

    counted, tokens = _check_counted_vs_analytic(_method_model("fastv", "tiny"))  # the benchmark's FLOP count
    assert tokens.patches == 16
    assert point(QUICK, "fastv", 0.25) == ReduceConfig("fastv", layers=(2,), keep=0.25)  # its declared layers


def test_docs_methods_table_is_the_declared_one():
    """docs/methods.md carries the table `vlprune info --methods-table` prints for the built-in methods."""
    from pathlib import Path

    from vlprune.commands.info import methods_table

    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    builtin = [n for n in vlprune.list_methods() if get_spec(n).build.__module__.startswith("vlprune.")]
    assert methods_table(builtin) in text, "docs/methods.md: paste the output of `vlprune info --methods-table`"


@pytest.mark.parametrize("option,value,match", [
    (Option(0.5, "float", lo=0.0, hi=1.0), 1.5, r"x: o must be in \[0, 1\], got 1.5"),
    (Option(0.5, "float", lo=0.0, hi=1.0), float("nan"), "must be in"),
    (Option(True, "bool"), 1, "must be True or False, got 1"),
    (Option(1, "int", lo=1), 0, "must be an integer >= 1, got 0"),
    (Option(1, "int", lo=1), True, "must be an integer >= 1, got True"),
    (Option(1.0, "positive"), 0.0, "must be a number > 0"),
    (Option("a", "choice", choices=("a", "b")), "c", r"must be one of \['a', 'b'\], got 'c'"),
])
def test_option_checks_name_value_and_range(option, value, match):
    with pytest.raises(ValueError, match=match):
        option.check("x", "o", value)


def test_options_are_checked_before_the_builder_runs(tiny_cfg):
    with pytest.raises(ValueError, match=r"laps: beta must be in \[0, 1\], got 2"):
        vlprune.build_model(tiny_cfg, method=RC("laps", options={"beta": 2}))
    with pytest.raises(ValueError, match=r"tip: tau must be a number > 0, got -1"):
        vlprune.build_model(tiny_cfg, method=RC("tip", options={"tau": -1}))
    with pytest.raises(ValueError, match="random: seed must be an integer >= 0"):
        vlprune.build_model(tiny_cfg, method=RC("random", options={"seed": -3}))


def test_every_method_with_losses_has_them_registered():
    names = learned_methods()
    assert set(names) == {"tip", "dynamicvit"}
    assert {n for n in vlprune.list_methods() if get_spec(n).learned} == {"tip", "laps", "dynamicvit"}
    from vlprune.objectives import dynamicvit, tip  # noqa: F401  (they register their losses)

    missing = [n for n in names if n not in method_objectives._LOSSES]
    assert not missing, f"methods declaring losses without a registered loss: {missing}"


def test_tasks_read_traits_not_names(tiny_cfg, monkeypatch):
    """A new method is text-guided / learned for the tasks because it says so, not because of its name."""
    def build(cfg, model, opts):
        pass

    spec = MethodSpec("mine", build, groups=("vision",), text_guided=True, learned=True, losses=("ratio",))
    monkeypatch.setitem(registry._REGISTRY, "mine", spec)
    model = vlprune.build_model(tiny_cfg, method="mine")
    assert is_text_guided(model) and learned_method(model) == "mine"
    assert "mine" in vlprune.list_methods() and vlprune.list_methods()[-1] == "mine"
    vlprune.attach(model, None)
    assert not is_text_guided(model) and learned_method(model) is None


def test_clear_removes_what_a_method_added(tiny_cfg):
    model = vlprune.build_model(tiny_cfg, method="laps")
    assert hasattr(model, "laps")
    vlprune.attach(model, RC("lowres", options={"image_size": 16}))
    assert not hasattr(model, "laps") and model.vision.embeddings.input_size == 16
    vlprune.attach(model, None)
    assert model.vision.embeddings.input_size is None


def test_none_with_settings_raises_everywhere(tiny_cfg):
    import pytest as _pytest

    model = vlprune.build_model(tiny_cfg)
    with _pytest.raises(ValueError, match="takes no layers, keep or options"):
        vlprune.attach(model, RC("none", layers=(2,)))
    assert vlprune.attach(model, RC("none")).method_config is None


def test_clear_after_install_without_attach(tiny_cfg):
    """The benchmark checks configs with install() + clear_reducers(): what a method set must go even though
    model.method_config was never set."""
    from vlprune.reduce.registry import install

    model = vlprune.build_model(tiny_cfg)
    install(RC("lowres", options={"image_size": 16}), model)
    install(RC("laps"), model)
    model.clear_reducers()
    assert model.vision.embeddings.input_size is None and not hasattr(model, "laps")
