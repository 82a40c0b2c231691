"""``vlprune protocols``: the plan (stage order, which checkpoint feeds which, equal budgets), the numbers
(plateau, intervals), a tiny run of the TiP protocol (report, curves, resume after a killed stage), and that
TRIPS is active in pre-training."""

import json
import math
import random
from dataclasses import replace

import pytest

from vlprune.cli import main
from vlprune.demo import profiles as demo_profiles
from vlprune.demo.stages import DONE
from vlprune.protocols import build_plan, run_protocols
from vlprune.protocols import run as prun
from vlprune.protocols.plan import keep_per_layer
from vlprune.protocols.profiles import DEFAULT, FULL, PROTOCOLS, QUICK, check_protocols, get_profile
from vlprune.protocols.summary import plateau, t_interval, wilson

# the quick profile, cut further: 2 steps a stage, 3 validation points (so that convergence is judged)
TINY = replace(QUICK, vqa=replace(QUICK.vqa, steps=3), vilt_warmup=replace(QUICK.vilt_warmup, steps=3),
               tip_stage1=3, tip_stage2=3, val_points=3, val_images=8, n_boot=100)


def test_stage_order_and_feeds():
    plan = build_plan(FULL)
    order = list(plan.trains)
    for t in plan.trains.values():  # every stage runs after the ones it starts from and distils from
        for dep in (t.init, t.teacher):
            assert dep is None or order.index(dep) < order.index(t.name), (t.name, dep)
    tr = plan.trains
    for s in FULL.seeds:
        for m in ("trips", "elip"):
            assert tr[f"pt-{m}-s{s}"].task == "pretrain" and tr[f"pt-{m}-s{s}"].method["name"] == m
            assert tr[f"pt-none-s{s}"].method is None
            for pt in ("none", m):
                for ft in ("none", m):
                    for short in ("vqa", "ret"):
                        t = tr[f"{short}-{pt}-{ft}-s{s}"]
                        assert t.init == f"pt-{pt}-s{s}" and (t.method or {}).get("name", "none") == ft
        # TiP: warm-up (unpruned, from scratch, single-stream) -> stage 1 -> stage 2, both distilled from the warm-up
        warm, s1, s2 = tr[f"vilt-warm-s{s}"], tr[f"tip1-s{s}"], tr[f"tip2-s{s}"]
        assert warm.init is None and warm.method is None and warm.arch == s1.arch == s2.arch == "vilt"
        assert (s1.init, s2.init, s1.teacher, s2.teacher) == (warm.name, s1.name, warm.name, warm.name)
        assert (s1.options["stage"], s2.options["stage"]) == (1, 2) and s2.method["name"] == "tip"
        for m in ("evit", "tome", "random", "none"):
            assert tr[f"vilt-{m}-s{s}"].init == warm.name and tr[f"vilt-{m}-s{s}"].arch == "vilt"
        # LAPS: released mode = the summed-hinge warm-up, then hardest negatives; both modes from the pre-training
        assert tr[f"laps-released-s{s}"].init == f"laps-warm-s{s}" and tr[f"laps-warm-s{s}"].init == f"pt-none-s{s}"
        assert tr[f"laps-warm-s{s}"].options["hardest"] is False and tr[f"laps-released-s{s}"].method["options"]["official"]
        assert tr[f"laps-paper-s{s}"].method["options"]["official"] is False
        # DynamicViT: from the unpruned VQA fine-tune, distilled from it
        d = tr[f"dvit-dynamicvit-s{s}"]
        assert d.init == d.teacher == f"vqa-none-none-s{s}" and tr[f"dvit-evit-s{s}"].teacher is None
    assert len([n for n in order if n.startswith("pt-none-")]) == len(FULL.seeds)  # shared, planned once a seed


@pytest.mark.parametrize("prof", [QUICK, DEFAULT, FULL], ids=lambda p: p.name)
def test_equal_budgets(prof):
    plan = build_plan(prof)
    tables = {}
    for r in plan.rows:
        tables.setdefault((r.protocol, r.table), set()).add(plan.budget(r))
        assert r.eval == f"eval-{r.chain[-1]}"
    assert len(tables) == 7  # trips x2, elip x2, tip, laps, dynamicvit
    assert all(len(b) == 1 for b in tables.values()), tables
    seeds = {(r.protocol, r.table, r.label): set() for r in plan.rows}
    for r in plan.rows:
        seeds[(r.protocol, r.table, r.label)].add(r.seed)
    assert all(s == set(prof.seeds) for s in seeds.values())


def test_profiles_take_the_demo_benchmark_by_reference():
    rel = demo_profiles.DEFAULT
    assert DEFAULT.base is rel and FULL.base is rel and len(FULL.seeds) == 3 and len(DEFAULT.seeds) == 1
    assert DEFAULT.model() == dict(rel.model) and DEFAULT.keep == rel.main_keep
    assert DEFAULT.pretrain.steps == rel.pretrain.steps and DEFAULT.pretrain.lr == rel.pretrain.lr
    sc = DEFAULT.scenes  # only the test share grows, to a gallery of at least 1000 images
    assert replace(sc, test_fraction=rel.scenes.test_fraction) == rel.scenes
    assert round(sc.images * sc.test_fraction) >= 1000
    vilt = DEFAULT.model("vilt")
    assert vilt["arch"] == "vilt" and vilt["vision.width"] == rel.model["vision.width"]


def test_unknown_protocol_or_profile(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown protocol\(s\) \['nope'\]; valid protocols: \['trips'"):
        check_protocols(["trips", "nope"])
    with pytest.raises(ValueError, match="unknown protocols profile 'huge'; valid profiles: \\['quick', 'default'"):
        get_profile("huge")
    assert check_protocols([]) == PROTOCOLS and check_protocols(["laps", "trips"]) == ("trips", "laps")
    assert main(["protocols", "nope", "--profile", "quick", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "unknown protocol(s) ['nope']" in capsys.readouterr().err
    assert main(["protocols", "--profile", "huge", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "unknown protocols profile 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no protocols run"):
        run_protocols(tmp_path / "f", ["tip"], TINY, quiet=True)


def test_plateau_against_a_naive_reading():
    assert plateau([(1, 10), (2, 50), (3, 60), (4, 60.5), (5, 60.2), (6, 60.9)], tol=1.0) is True
    assert plateau([(1, 10), (2, 20), (3, 30), (4, 40), (5, 50), (6, 60)], tol=1.0) is False
    assert plateau([(1, 10), (2, 20)], tol=1.0) is None
    rng = random.Random(0)
    for _ in range(200):
        vals = [rng.uniform(0, 100) for _ in range(rng.randint(3, 9))]
        k = len(vals) // 3 or 1
        naive = max(vals[-k:]) <= max(vals[:-k]) + 2.0
        assert plateau(list(enumerate(vals)), tol=2.0) is naive


def test_intervals_against_references():
    lo, hi = wilson(5, 10)  # the textbook Wilson interval of 5/10: 23.7% .. 76.3%
    assert abs(lo - 23.66) < 0.05 and abs(hi - 76.34) < 0.05
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 100.0
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2) = 4.303
    assert abs(iv[0] - (2 - 4.303 / math.sqrt(3))) < 1e-9 and abs(iv[1] - (2 + 4.303 / math.sqrt(3))) < 1e-9
    assert t_interval([5.0]) is None
    for f, layers in ((0.35, (1, 2, 3)), (0.5, (2, 3)), (0.25, (1,))):
        assert abs(keep_per_layer(f, layers) ** len(layers) - f) < 1e-3


@pytest.fixture(scope="module")
def tip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocols") / "run"
    report = run_protocols(out, ["tip"], TINY, threads=1, quiet=True)
    return out, report


def test_tip_run_report_and_feeds(tip_run):
    out, report = tip_run
    text = report.read_text()
    assert "TiP on the single-stream (ViLT-style) model, two stages" in text and "SMOKE RUN" in text
    assert "TiP claims" in text and ("claim held" in text or "claim did not hold" in text)
    res = json.loads((out / "results.json").read_text())
    rows = res["results"]["tip"]["tables"]["vqa"]
    assert [r["label"] for r in rows] == ["TiP (stage 1 + stage 2, distilled)", "unpruned", "evit", "tome", "random"]
    assert len({r["budget"] for r in rows}) == 1 and all(r["warmup"] == 3 * 8 for r in rows)  # the shared unpruned warm-up
    assert all(r["converged"] in (True, False) for r in rows)  # 3 validation points: judged
    for r in rows:
        assert 0 <= r["low"] <= r["value"] <= r["high"] <= 100
    assert rows[0]["image_tokens"] < rows[1]["image_tokens"]  # TiP prunes the joint encoder's image tokens
    # stage order as planned, and each stage started from the checkpoint it should
    ran = [t["stage"] for t in res["stages"]]
    assert ran.index("vilt-warm-s0") < ran.index("tip1-s0") < ran.index("tip2-s0") < ran.index("eval-tip2-s0")
    cfg = {n: json.loads((out / n / "train_config.json").read_text()) for n in ("tip1-s0", "tip2-s0", "vilt-evit-s0")}
    assert cfg["tip1-s0"]["init"] == str(out / "vilt-warm-s0") and cfg["tip2-s0"]["init"] == str(out / "tip1-s0")
    assert cfg["tip1-s0"]["task_options"]["teacher"] == str(out / "vilt-warm-s0")
    assert cfg["tip2-s0"]["task_options"]["stage"] == 2 and cfg["vilt-evit-s0"]["method"]["name"] == "evit"
    tr = res["train"]
    assert [s for s, _ in tr["tip2-s0"]["val"]] == [1, 2, 3] and tr["tip2-s0"]["loss"]
    for name in ("vilt-warm-s0", "tip1-s0", "tip2-s0", "vilt-none-s0"):  # validation accuracy in percent
        assert all(0 <= v <= 100 for _, v in tr[name]["val"]), tr[name]["val"]
    # the last validation point scores the last checkpoint: the saved model, evaluated directly, gives the same
    from vlprune.demo import steps

    direct = steps.eval_vqa(out / "vilt-none-s0", "saved", out / "data" / prun.VAL, "vqa_test.json", 32, False)
    assert abs(tr["vilt-none-s0"]["val"][-1][1] - direct["accuracy"]) < 1e-6
    assert not list((out / "tip2-s0").glob("checkpoint-*"))  # scored, then deleted
    for label in ("tip-stage-1-stage-2-distilled", "unpruned", "evit", "tome", "random"):
        assert (out / "curves" / f"tip-vqa-{label}.png").stat().st_size > 1000


def test_killed_stage_is_the_only_one_redone(tip_run, monkeypatch):
    out, _ = tip_run
    (out / "tip2-s0" / DONE).unlink()  # as if the run had been killed inside this stage
    real = prun.train_stage

    def killed(d, t, *a, **k):
        if t.name == "tip2-s0":
            raise KeyboardInterrupt("killed")
        return real(d, t, *a, **k)

    monkeypatch.setattr(prun, "train_stage", killed)
    with pytest.raises(KeyboardInterrupt):
        run_protocols(out, ["tip"], TINY, quiet=True)
    monkeypatch.setattr(prun, "train_stage", real)
    run_protocols(out, ["tip"], TINY, quiet=True)
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert [s["stage"] for s in stages if not s["cached"]] == ["tip2-s0"]


def test_trips_is_active_in_pretraining(tmp_path, monkeypatch):
    """A pre-training step with TRIPS encodes fewer image tokens than the unpruned one (traced), and saves less
    for backward."""
    from vlprune.demo import steps
    from vlprune.models.albef import ALBEF

    prof = replace(TINY, base=replace(TINY.base, pretrain=replace(TINY.base.pretrain, steps=2)))
    plan = build_plan(prof, ["trips"])
    out = tmp_path / "o"
    steps.make_data(out / "data", prof.scenes, prof.scenes.image_size, 300)
    steps.make_data(out / "data" / prun.VAL, replace(prof.scenes, images=8, seed=7, test_fraction=0.5),
                    prof.scenes.image_size, 300)
    prun._model_json(out, prof, "albef")
    seen = []
    real = ALBEF.encode_image

    def traced(self, *a, **k):
        state = real(self, *a, **k)
        if self.training:
            seen.append(state.num_tokens)
        return state

    monkeypatch.setattr(ALBEF, "encode_image", traced)
    res = {}
    for m in ("none", "trips"):
        seen.clear()
        t = plan.trains[f"pt-{m}-s0"]
        (out / t.name).mkdir()
        res[m] = prun.train_stage(out / t.name, t, prun.train_config(out, prof, t), prof, False)
        res[m]["tokens"] = set(seen)
    patches = 1 + (32 // 4) ** 2
    assert res["none"]["tokens"] == {patches}
    (n,) = res["trips"]["tokens"]
    assert n < patches * 0.7  # keep 0.5 (+ [CLS] and the fused token)
    assert res["trips"]["saved_mib"] < res["none"]["saved_mib"]
    assert res["trips"]["samples_per_s"] > 0 and res["none"]["steps"] == 2


@pytest.mark.slow
def test_every_protocol_quick_from_the_cli(tmp_path, capsys):
    out = tmp_path / "all"
    assert main(["protocols", "--profile", "quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert list(res["results"]) == list(PROTOCOLS)
    for p in PROTOCOLS:
        assert res["results"][p]["verdict"] in printed and res["results"][p]["verdict"] in text
    for m in ("trips", "elip"):
        speed = res["results"][m]["pretrain"]
        assert [s["pretrain"] for s in speed] == ["none", m] and speed[1]["saved_mib"] < speed[0]["saved_mib"]
        assert set(res["results"][m]["tables"]) == {"vqa", "retrieval"}
    laps = [r["label"] for r in res["results"]["laps"]["tables"]["retrieval"]]
    assert laps == ["unpruned", "trips", "evit", "tome", "LAPS (paper mode)", "LAPS (released mode)"]
    n = 2 + math.floor(0.4 * QUICK.keep * (32 // 4) ** 2)  # [CLS], lam * keep * N aggregates, the fused token
    assert [r["slimmed_tokens"] for r in res["results"]["laps"]["tables"]["retrieval"]] == [None] * 4 + [n, n]
    assert [r["label"] for r in res["results"]["dynamicvit"]["tables"]["vqa"]] == ["unpruned", "dynamicvit", "evit"]
    # a second run reuses every stage
    assert main(["protocols", "--profile", "quick", "--out", str(out), "--quiet"]) == 0
    assert all(s["cached"] for s in json.loads((out / "results.json").read_text())["stages"])


def test_plan_flag_and_estimate(capsys):
    assert main(["protocols", "--plan", "--profile", "quick", "tip"]) == 0
    out = capsys.readouterr().out
    assert "tip2-s0" in out and "from tip1-s0, distilled from vilt-warm-s0" in out and "expected total" in out
    from vlprune.protocols.run import estimate, weights

    both = estimate(build_plan(DEFAULT, ["trips", "laps"]), 25.0)
    alone = [estimate(build_plan(DEFAULT, [p]), 25.0) for p in ("trips", "laps")]
    assert abs(both["total"] - sum(v for k, v in both.items() if k != "total")) < 1e-6
    # the shared stages (unpruned pre-training, unpruned and TRIPS retrieval fine-tunes) are counted once
    w = weights(build_plan(DEFAULT, ["trips", "laps"]))
    shared = sum(w[n] for n in ("pt-none-s0", "ret-none-none-s0", "ret-none-trips-s0", "eval-ret-none-none-s0",
                                "eval-ret-none-trips-s0")) / 25.0 + w["data"] / 25.0
    assert abs(alone[0]["total"] + alone[1]["total"] - both["total"] - shared) < 1e-6
    assert main(["protocols", "--plan", "--rate", "0", "--profile", "quick"]) == 2


def test_training_stage_resumes_from_its_checkpoint(tip_run, monkeypatch):
    """A training stage stopped by a signal keeps its checkpoint; the next call resumes it (not a fresh run) and
    the loss and validation records are those of one uninterrupted run."""
    import signal

    out, _ = tip_run
    t = replace(build_plan(TINY, ["tip"]).trains["vilt-none-s0"], name="again")
    d = out / "again"
    d.mkdir()

    class Stop(prun.SavedMemory):
        def step(self, step, *a):
            super().step(step, *a)
            if step == 2:
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(prun, "SavedMemory", Stop)
    with pytest.raises(KeyboardInterrupt, match="interrupted"):
        prun.train_stage(d, t, prun.train_config(out, TINY, t), TINY, False)
    monkeypatch.undo()
    res = prun.train_stage(d, t, prun.train_config(out, TINY, t), TINY, False)
    assert res["resumed"] and res["steps"] == t.steps
    assert [s for s, _ in res["loss"]] == list(range(1, t.steps + 1)) and len(res["val"]) == 3


def test_a_demo_profile_without_pretraining_is_refused():
    base = replace(demo_profiles.QUICK, pretrain=replace(demo_profiles.QUICK.pretrain, steps=0),
                   warmup=replace(demo_profiles.QUICK.warmup, steps=0), first_parts=())
    with pytest.raises(ValueError, match="demo profile quick has no pre-training"):
        build_plan(replace(QUICK, base=base), ["trips"])


def _fake_results(plan, rng):
    """Stage results with known numbers: every VQA row right on the same 60 of 100 questions except 'worse' runs
    (right on 40), TRIPS pre-training 2x faster, ELIP's slower; curves that level off except for tome rows."""
    res = {"train": {}, "eval": {}}
    for name, t in plan.trains.items():
        fast = {"pt-trips": 40.0, "pt-elip": 15.0}.get(name.rsplit("-", 1)[0], 20.0)
        rising = "tome" in name
        res["train"][name] = {"samples_per_s": fast, "train_seconds": 100 * 20 / fast, "saved_mib": 100.0,
                              "cuda_peak_mib": None, "loss": [[1, 2.0], [2, 1.0]],
                              "val": [[s, 10.0 * s if rising else 50 + 0.1 * s] for s in range(1, 7)],
                              "val_metric": "accuracy" if t.task == "vqa" else "r_mean"}
    for name, e in plan.evals.items():
        worse = e.run.startswith(("vilt-random", "dvit-evit"))
        if e.kind == "vqa":
            res["eval"][name] = {"scores": [1.0] * (40 if worse else 60) + [0.0] * (60 if worse else 40),
                                 "image_tokens": 10.0}
        else:
            r = {k: 50.0 for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")}
            res["eval"][name] = {**r, "r_mean": 50.0 + rng.uniform(-1, 1), "images": 1000, "captions": 2000,
                                 "image_tokens": 10.0}
    return res


def test_report_sections_and_verdicts_follow_the_numbers(tmp_path, monkeypatch):
    from vlprune.protocols import report as prep
    from vlprune.protocols.report import TITLES, write_report

    drawn = []  # the figures themselves are drawn in the TiP run above; here only which ones

    def figure(plan, res, rows, path, title):
        drawn.append(path.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
        return path

    monkeypatch.setattr(prep, "curve_figure", figure)
    plan = build_plan(replace(DEFAULT, seeds=(0, 1), n_boot=200))
    report = write_report(tmp_path, plan, _fake_results(plan, random.Random(0)), [], 1, 10.0)
    text = report.read_text()
    for p in PROTOCOLS:
        assert f"## {TITLES[p]}" in text
    v = json.loads((tmp_path / "results.json").read_text())["results"]
    assert "x2.00" in v["trips"]["verdict"] and "The claim held" in v["trips"]["verdict"]
    assert "x0.75" in v["elip"]["verdict"] and "The claim did not hold" in v["elip"]["verdict"]
    # TiP ties unpruned, EViT and ToMe and beats random (right on 60 against 40 of the same questions)
    assert "minus random: +20.0 points" in v["tip"]["verdict"] and "The claim held" in v["tip"]["verdict"]
    assert "Not converged" in v["tip"]["verdict"] and "vqa: tome" in v["tip"]["verdict"]
    assert "The claim held" in v["dynamicvit"]["verdict"] and "minus evit: +20.0 points" in v["dynamicvit"]["verdict"]
    tip_rows = {r["label"]: r for r in v["tip"]["tables"]["vqa"]}
    assert tip_rows["tome"]["converged"] is False and tip_rows["evit"]["converged"] is True
    assert tip_rows["random"]["vs_first"]["diff"] == pytest.approx(-20.0) and tip_rows["random"]["vs_first"]["p"] < 0.05
    laps = v["laps"]["tables"]["retrieval"]
    assert all(r["low"] is not None and r["low"] <= r["value"] <= r["high"] for r in laps)  # 2 seeds: t interval
    n_rows = sum(len(rows) for p in v.values() for rows in p["tables"].values())
    assert len(drawn) == len(set(drawn)) == n_rows == 30 and all(f"({'curves/' + d})" in text for d in drawn)
