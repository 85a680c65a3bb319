"""``mmm bench --suite recipes``: FLOP counting, equal budgets, and the text suite end to end at smoke size."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import recipe_budget, recipes, suite
from mmm.cli import main as cli_main
from mmm.downstream.tasks import downstream_tasks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cpu_attention_is_counted_forward_and_backward():
    B, H, L, D = 2, 3, 16, 8
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    with FlopCounterMode(display=False, custom_mapping=recipe_budget._extra_flop_formulas()) as counted:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    if plain.get_total_flops() == 0:  # the CPU kernel, unknown to FlopCounterMode: added by recipe_budget
        # forward QK^T and PV: 2 x (2 B H L L D); backward (PyTorch's formula, as for its GPU kernels):
        # the recomputed scores and four gradient products, 5 x (2 B H L L D)
        assert counted.get_total_flops() == 7 * 2 * B * H * L * L * D
    else:
        assert counted.get_total_flops() == plain.get_total_flops()


def test_steps_for_budget_rounds_to_the_nearest_step():
    assert recipe_budget.steps_for_budget(1000.0, 100.0) == 10
    assert recipe_budget.steps_for_budget(1000.0, 130.0) == 8  # 7.69 -> 8
    assert recipe_budget.steps_for_budget(10.0, 100.0) == 1  # at least one step
    for fps in (77.0, 130.0, 333.0):
        assert abs(recipe_budget.budget_error(1000.0, fps, recipe_budget.steps_for_budget(1000.0, fps))) <= 0.5
    with pytest.raises(ValueError, match="flops_per_step"):
        recipe_budget.steps_for_budget(1000.0, 0.0)


def test_spent_flops_by_phase():
    assert recipes.spent_flops([2, 3], [10.0, 20.0]) == 80.0
    with pytest.raises(ValueError, match="phase"):
        recipes.spent_flops([5], [10.0, 20.0])


def test_recipes_suite_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--modality"):
        suite.run_suite("recipes", tmp_path)
    with pytest.raises(ValueError, match="one of"):
        suite.run_suite("recipes", tmp_path, modality="smell")
    with pytest.raises(ValueError, match="recipes suite only"):
        suite.run_suite("throughput", tmp_path, modality="text")
    with pytest.raises(SystemExit):
        cli_main(["bench", "--suite", "recipes", "--modality", "smell"])


def test_every_modality_has_its_baseline_preset():
    for m, group in recipes.GROUPS.items():
        present, skipped = recipes.available(group)
        assert group.baseline in [r.name for r in present], m
        assert all((recipes.CONFIGS / f"{r.preset}.yaml").is_file() for r in present)
        assert all("not in this checkout" in s["reason"] for s in skipped)
        assert all(t in downstream_tasks() for t in group.tasks)


def test_every_recipe_config_loads_with_its_overrides():
    for m, group in recipes.GROUPS.items():
        present, _ = recipes.available(group)
        for r in present:
            cfg = recipes.recipe_config(r)  # a bad override key or value is a ConfigError here
            assert cfg.trainer.max_steps > 0, (m, r.name)


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["dna", "audio"])
def test_dna_and_audio_suites_run_every_recipe_at_smoke_size(modality, tmp_path, monkeypatch):
    monkeypatch.setenv(suite.MICRO_ENV, "1")
    assert cli_main(["bench", "--suite", "recipes", "--modality", modality, "--quick", "--out", str(tmp_path)]) == 0
    sec = json.loads((tmp_path / "results.json").read_text())["sections"]["recipes"]
    assert sec["skipped"] == [] and sec["budget_problems"] == []
    assert [r["name"] for r in sec["recipes"]] == [r.name for r in recipes.GROUPS[modality].recipes]
    rows = {(r["recipe"], r["task"]) for r in sec["results"]}
    assert {(r.name, t) for r in recipes.GROUPS[modality].recipes for t in recipes.GROUPS[modality].tasks} <= rows


def test_text_suite_smoke_equal_budgets_and_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv(suite.MICRO_ENV, "1")
    assert cli_main(["bench", "--suite", "recipes", "--modality", "text", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["suite"] == "recipes" and data["sizes"] == "micro"
    sec = data["sections"]["recipes"]
    names = [r["name"] for r in sec["recipes"]]
    assert names[:4] == ["mlm-15", "mlm-30", "electra", "electra-gdes"]
    budget = sec["budget_flops"]
    assert budget == pytest.approx(sec["cost"]["mlm-15"]["flops_per_step"] * sec["baseline_steps"])
    # ELECTRA's generator costs FLOPs; 30 % masking predicts more positions: both above MLM 15 % per step
    assert sec["cost"]["electra"]["flops_per_step"] > sec["cost"]["mlm-15"]["flops_per_step"]
    assert sec["cost"]["mlm-30"]["flops_per_step"] > sec["cost"]["mlm-15"]["flops_per_step"]
    for name in names:
        plan, cost = sec["plan"][name], sec["cost"][name]
        assert abs(plan["flops"] - budget) <= cost["flops_per_step"], name  # within a step's worth
        assert [run["steps"] for run in sec["runs"][name]] == [plan["steps"]] * sec["sizes"]["seeds"]
        assert cost["tokens_per_s"] > 0 and cost["step_seconds_median"] > 0
    assert sec["budget_problems"] == []
    # the check recomputes the FLOPs from the steps: one step more for ELECTRA is off budget
    tampered = copy.deepcopy(sec)
    tampered["plan"]["electra"]["steps"] += 2
    tampered["plan"]["electra"]["phase_steps"] = [tampered["plan"]["electra"]["steps"]]
    assert any(p.startswith("electra:") for p in recipes.budget_problems(tampered))

    rows = {(r["recipe"], r["task"]): r for r in sec["results"]}
    for name in names + ["random init"]:
        r = rows[(name, "stdlib-package")]
        for metric in ("finetune", "linear_probe", "knn"):
            assert 0.0 <= r[metric]["mean"] <= 1.0 and r[metric]["n"] == sec["sizes"]["seeds"]
    md = (tmp_path / "results.md").read_text()
    assert "## Recipes at equal compute: text" in md and "| electra |" in md and "| stdlib-package (real) | random init |" in md
    png = (tmp_path / "recipes_text.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


@pytest.mark.slow
def test_vl_suite_scores_retrieval_and_itm_for_every_recipe_and_the_initialisation(tmp_path, monkeypatch):
    monkeypatch.setenv(suite.MICRO_ENV, "1")
    assert cli_main(["bench", "--suite", "recipes", "--modality", "vl", "--quick", "--out", str(tmp_path)]) == 0
    sec = json.loads((tmp_path / "results.json").read_text())["sections"]["recipes"]
    assert sec["skipped"] == [] and sec["budget_problems"] == []
    vl = {r["recipe"]: r for r in sec["vl_results"]}
    assert set(vl) == {r.name for r in recipes.GROUPS["vl"].recipes} | {"random init"}
    for name, row in vl.items():
        for k in ("t2i@1", "i2t@1", "t2i@5", "i2t@5"):
            assert 0.0 <= row[k]["mean"] <= 1.0 and row[k]["n"] == sec["sizes"]["seeds"], (name, k)
            assert row[f"chance {k}"]["mean"] < 1.0
        assert row["t2i@5"]["mean"] >= row["t2i@1"]["mean"]
    # ITM accuracy where the recipe has an itm head; the contrastive-only recipes have none
    assert vl["uniter"]["itm"] is not None and vl["itc"]["itm"] is None and vl["itc-soft"]["itm"] is None
    md = (tmp_path / "results.md").read_text()
    assert "Zero-shot retrieval on the held-out image-caption pairs" in md and "| itc-soft |" in md


def _part(recipe: str, sizes: recipes.RecipeSizes, finetune: float) -> dict:
    """A section as ``run(..., only=[recipe])`` returns it, with one recipe trained and scored."""
    import dataclasses

    both = ["mlm-15", "mlm-30"]
    return {"modality": "text", "baseline": "mlm-15", "sizes": dataclasses.asdict(sizes), "threads": 1,
            "budget_flops": 1000.0, "baseline_steps": sizes.baseline_steps["text"], "only": [recipe],
            "recipes": [{"name": n, "preset": "text_mlm_tiny", "overrides": {}, "what": n} for n in both],
            "skipped": [],
            "cost": {n: {"flops_per_step": 100.0, "tokens_per_s": 1.0, "step_seconds_median": 0.1} for n in both},
            "plan": {n: {"steps": 10, "phase_steps": [10], "flops": 1000.0, "budget_error_steps": 0.0} for n in both},
            "runs": {recipe: [{"steps": 10, "wall_s": 5.0}]},
            "scores": {recipe: {"t": {"chance": [0.2], "finetune": [finetune], "linear_probe": [0.5], "knn": [0.4]}}},
            "vl_scores": {}, "tasks": {"t": "synthetic"}, "splits": {"t": [10, 5, 5]}}


def test_merge_joins_a_timed_part_and_a_no_timing_part_but_not_different_sizes():
    import dataclasses

    timed = recipes.SIZES["full"]
    untimed = dataclasses.replace(timed, name="full+custom", timing_rounds=0)  # what --no-timing makes
    merged = recipes.merge([_part("mlm-15", timed, 0.6), _part("mlm-30", untimed, 0.7)], log=lambda _: None)
    assert {r["recipe"]: r["finetune"]["mean"] for r in merged["results"]} == {"mlm-15": 0.6, "mlm-30": 0.7}
    assert [p["sizes"] for p in merged["parts"]] == ["full", "full+custom"]
    assert merged["budget_problems"] == []
    # another modality's baseline steps do not matter; this one's, the seeds or the downstream sizes do
    other = dataclasses.replace(timed, name="x", baseline_steps={**timed.baseline_steps, "dna": 1})
    recipes.merge([_part("mlm-15", timed, 0.6), _part("mlm-30", other, 0.7)], log=lambda _: None)
    for change in ({"seeds": 1}, {"baseline_steps": {**timed.baseline_steps, "text": 99}}):
        bad = dataclasses.replace(timed, name="full+custom", **change)
        field_name = next(iter(change))
        with pytest.raises(ValueError, match=f"differ in {field_name}"):
            recipes.merge([_part("mlm-15", timed, 0.6), _part("mlm-30", bad, 0.7)], log=lambda _: None)


def test_a_multi_task_step_costs_the_weighted_mean_of_its_tasks():
    """The first 2-4 batches of a task mixture can miss a task: LXMERT's cheaper ITC steps were never counted."""
    assert recipe_budget.step_mean([10.0, 20.0, 30.0], ["a", "a", "b"], None) == 20.0
    # task a averages 15 (weight 3), b 30 (weight 1): 0.75 x 15 + 0.25 x 30
    assert recipe_budget.step_mean([10.0, 20.0, 30.0], ["a", "a", "b"], {"a": 3.0, "b": 1.0}) == pytest.approx(18.75)


@pytest.mark.slow
def test_lxmert_is_costed_over_every_task_of_its_mixture():
    from mmm.config import load_config

    cfg = load_config(recipes.CONFIGS / "vl_lxmert_tiny.yaml", {**recipes.SIZES["micro"].overrides,
                                                                 "trainer.default_root_dir": "unused"})
    cost = recipe_budget.measure_recipe("lxmert", cfg, batches=2)
    tasks = {t.name: t.weight for t in cfg.tasks}
    by_task = {}
    for flops, batch in zip(cost.flops_batches, cost._batches):
        by_task.setdefault(batch.task, []).append(flops)
    assert set(by_task) == set(tasks)  # every task counted, though the first batches hold no itc step
    want = sum(tasks[t] * sum(f) / len(f) for t, f in by_task.items()) / sum(tasks.values())
    assert cost.flops_per_step == pytest.approx(want)
    assert min(sum(f) / len(f) for f in by_task.values()) < 0.6 * cost.flops_per_step  # itc skips the fusion layers


def test_gradient_accumulation_is_refused_by_the_cost_count():
    from mmm.config import load_config

    cfg = load_config(recipes.CONFIGS / "text_mlm_tiny.yaml", {"trainer.accumulate_grad_batches": 2})
    with pytest.raises(ValueError, match=r"recipe mlm: trainer.accumulate_grad_batches is 2; .* data.batch_size"):
        recipe_budget.measure_recipe("mlm", cfg)


def test_a_budget_under_two_steps_and_a_recipe_no_part_trained_are_problems():
    timed = recipes.SIZES["full"]
    sec = _part("mlm-15", timed, 0.6)
    sec["cost"]["mlm-30"]["flops_per_step"] = 600.0  # a budget of 1000 covers 1.67 of its steps
    sec["plan"]["mlm-30"] = {"steps": 2, "phase_steps": [2], "flops": 1200.0, "budget_error_steps": 0.33}
    problems = recipes.merge([sec], log=lambda _: None)["budget_problems"]
    assert any(p.startswith("mlm-30: the budget 1000 FLOPs covers 1.67 of its steps") for p in problems), problems
    assert "mlm-30: trained in none of the merged parts (no runs, no scores)" in problems


def test_the_smoke_size_keeps_its_small_model_when_a_flag_customises_it(tmp_path, monkeypatch):
    """``micro+custom`` (any --seeds/--no-timing/...) switched to the full model, so parts could not be merged."""
    seen = {}

    def fake_measure(name, cfg, batches=4):
        seen[name] = cfg.model.encoder.dim
        raise RuntimeError("stop after the first measurement")

    monkeypatch.setenv(suite.MICRO_ENV, "1")
    monkeypatch.setattr(recipes, "measure_recipe", fake_measure)
    with pytest.raises(RuntimeError, match="stop after"):
        recipes.main(["--modality", "text", "--no-timing", "--out", str(tmp_path)])
    assert seen == {"mlm-15": recipes.MICRO_MODEL["text"]["model.encoder.dim"]}


def test_merge_names_a_part_that_is_missing_or_not_a_recipes_result(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps({"sections": {"downstream": {}}}))
    for part, match in (("missing", r"missing/results.json: cannot read it"),
                        ("other", r"other/results.json holds no recipes section")):
        with pytest.raises(SystemExit):
            recipes.main(["--merge", str(tmp_path / part), "--out", str(tmp_path / "m")])
        assert match in capsys.readouterr().err


def test_merge_refuses_parts_that_fitted_their_own_tokenizers(tmp_path):
    """Two parts fitted a tokenizer each (not reproducible across processes): the merged table compared recipes
    trained on different vocabularies as if they shared one."""
    timed = recipes.SIZES["full"]
    a, b = _part("mlm-15", timed, 0.6), _part("mlm-30", timed, 0.7)
    for part, vocab in ((a, "x 1\n"), (b, "x 2\n")):
        folder = tmp_path / vocab.strip()
        (folder / "tokenizer").mkdir(parents=True)
        (folder / "tokenizer" / "vocab.txt").write_text(vocab)
        part["assets_fingerprint"] = recipes.assets_fingerprint(folder)
    with pytest.raises(ValueError, match=r"the parts used different shared assets .* run the parts with one --assets DIR"):
        recipes.merge([a, b], log=lambda _: None)
    b["assets_fingerprint"] = a["assets_fingerprint"]
    assert recipes.merge([a, b], log=lambda _: None)["budget_problems"] == []


def test_a_part_whose_shared_assets_changed_while_it_ran_is_refused(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.txt").write_text("x 1\n")
    start = recipes.assets_fingerprint(tmp_path)
    recipes.check_assets_unchanged(tmp_path, start)
    (tmp_path / "tokenizer" / "vocab.txt").write_text("x 2\n")  # another part's fit landed in the shared folder
    with pytest.raises(RuntimeError, match="changed while this part ran"):
        recipes.check_assets_unchanged(tmp_path, start)
