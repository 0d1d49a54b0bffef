"""`shrink sweep` on a tiny model: every point and its outputs, resume after an interrupt, the
refusal of a sweep of other settings, the Pareto frontier, the target rule, bench/eval --sweep."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from shrink.cli import app
from shrink.prune import pipeline
from shrink.prune.sweep import frontier, parse_targets, plan_points, plot_rows

from helpers import SENTENCES, assert_exit, tiny_config, tiny_tokenizer

runner = CliRunner()

CHEAP = [  # both recipes in well under a second per point on the tiny model
    "--set", "heads-a-star.steps.0.options.calibration_samples=8",
    "--set", "heads-a-star.steps.0.options.max_evaluations=20",
    "--set", "heads-a-star.steps.1.options.max_steps=2",
    "--set", "svd-kd.steps.0.options.calibration_samples=8",
    "--set", "svd-kd.steps.0.options.rank_multiple=1",
    "--set", "svd-kd.steps.1.options.max_steps=2",
    "--max-samples", "16", "--eval-samples", "8", "--max-length", "32",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT that takes the 128 tokens the latency benchmark uses, and SENTENCES."""
    import transformers as T

    root = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    model = T.BertModel(tiny_config("bert", max_position_embeddings=160)).eval()
    model.config.architectures = ["BertModel"]
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "data.txt").write_text("\n".join(SENTENCES) + "\n")
    return root


def sweep(setup, out, targets, *extra):
    args = ["sweep", str(setup / "model"), "--recipe", "heads-a-star", "--recipe", "svd-kd", "--data", str(setup / "data.txt"),
            "-o", str(out), "--targets", targets]
    return runner.invoke(app, [*args, *CHEAP, *map(str, extra)])


@pytest.fixture(scope="module")
def resumed(setup, tmp_path_factory):
    """A sweep interrupted (Ctrl-C) at its second point, then rerun with one more target; the prune
    runs of each invocation are recorded."""
    out = tmp_path_factory.mktemp("resumed") / "sweep"
    real, calls = pipeline.prune, {"first": [], "second": []}

    def interrupted(model_ref, recipes, where, settings, session=None):
        calls["first"].append(where.name)
        if len(calls["first"]) == 2:
            raise KeyboardInterrupt
        return real(model_ref, recipes, where, settings, session=session)

    def counted(model_ref, recipes, where, settings, session=None):
        calls["second"].append(where.name)
        return real(model_ref, recipes, where, settings, session=session)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "prune", interrupted)
        first = sweep(setup, out, "1.5")
        after_first = json.loads((out / "sweep.json").read_text())
        after_first["left_behind"] = sorted(p.name for p in (out / "points").iterdir())
        patch.setattr(pipeline, "prune", counted)
        second = sweep(setup, out, "1.5,2")
    return out, first, after_first, second, calls


def test_an_interrupted_sweep_keeps_its_done_points(resumed):
    _, first, after_first, _, calls = resumed
    assert first.exit_code == 130, first.output
    lines = [line for line in first.stderr.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "rerun the same command to resume" in lines[0], first.stderr
    assert calls["first"] == ["heads-a-star-1.5x", "svd-kd-1.5x"]
    assert [(p["recipe"], p["target"], p["status"]) for p in after_first["points"]] == [("heads-a-star", "1.5x", "done")]
    assert after_first.pop("left_behind") == ["heads-a-star-1.5x"]  # the interrupted point left nothing


def test_the_rerun_skips_the_done_points(resumed):
    out, _, after_first, second, calls = resumed
    assert second.exit_code == 0, second.output
    assert calls["second"] == ["heads-a-star-2x", "svd-kd-1.5x", "svd-kd-2x"]  # not heads-a-star-1.5x again
    assert "resuming: 1 of 4 points are done" in second.stderr
    document = json.loads((out / "sweep.json").read_text())
    done = {(p["recipe"], p["target"]): p for p in document["points"]}
    kept = {k: v for k, v in done[("heads-a-star", "1.5x")].items() if k != "frontier"}
    assert kept == {k: v for k, v in after_first["points"][0].items() if k != "frontier"}  # same timestamps and seconds


def test_a_sweep_writes_every_point_json_md_png_html(resumed):
    out, *_ = resumed
    document = json.loads((out / "sweep.json").read_text())
    points = document["points"]
    assert sorted((p["recipe"], p["target"]) for p in points) == [
        ("heads-a-star", "1.5x"), ("heads-a-star", "2x"), ("svd-kd", "1.5x"), ("svd-kd", "2x")]
    targets = {(p["recipe"], p["target"]): p["target_set"] for p in points}
    assert targets[("heads-a-star", "2x")] == {"step": 0, "heads_fraction": 0.5}  # share of heads removed: 1 - 1/S
    assert targets[("svd-kd", "2x")] == {"step": 0, "params_fraction": 0.5}  # share kept: 1/S
    for p in points:
        assert p["status"] == "done" and p["speedup"] > 0 and p["seconds"] > 0, p
        assert 0 < p["quality"]["embedding_cosine"] <= 1.0001 and p["params_total"] < document["original"]["params_total"]
        assert (out / "points" / f"{p['recipe']}-{p['target']}" / "config.json").is_file() and p["checkpoint"]
    assert document["original"]["quality"]["embedding_cosine"] == pytest.approx(1.0)
    view = plot_rows(document)
    assert [p["frontier"] for p in points] == [r["frontier"] for r in view["rows"][1:]]
    assert any(p["frontier"] for p in points) or view["rows"][0]["frontier"]
    table = (out / "sweep.md").read_text()
    assert table.count("| heads-a-star |") == 2 and table.count("| svd-kd |") == 2 and "| original |" in table and "**yes**" in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "sweep.html").read_text()
    assert "Pareto frontier" in html and "heads-a-star" in html and 'src="https://cdn' not in html and len(html) > 1_000_000  # plotly inlined


def test_a_point_is_the_model_prune_makes_alone(setup, resumed, tmp_path):
    """svd-kd at 1.5x ran second in its process, after another point had used the same teacher and
    data: still bit-identical to a lone prune (fresh copy of the original, seeds reset)."""
    out, *_ = resumed
    sets = [a.removeprefix("svd-kd.") for a in CHEAP[6:12]]
    result = runner.invoke(app, ["prune", str(setup / "model"), "--recipe", "svd-kd", "--data", str(setup / "data.txt"), "-o", str(tmp_path / "alone"),
                                 "--no-export", "--set", "steps.0.target={params_fraction: 0.6667}", *sets, *CHEAP[-6:]])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    alone, point = load_file(tmp_path / "alone" / "model.safetensors"), load_file(out / "points" / "svd-kd-1.5x" / "model.safetensors")
    assert alone.keys() == point.keys() and all(torch.equal(alone[k], point[k]) for k in alone)


def test_a_sweep_of_other_settings_is_refused(setup, resumed):
    out, *_ = resumed
    before = (out / "sweep.json").read_text()
    result = sweep(setup, out, "1.5", "--seed", "1")
    assert_exit(result, 2, "holds a sweep with other settings", "seed 0 -> 1")
    assert (out / "sweep.json").read_text() == before


def test_bench_and_eval_add_a_row(setup, resumed, tmp_path):
    import shutil

    slim = resumed[0] / "points" / "heads-a-star-2x"
    out = tmp_path / "copy"  # the other tests see the sweep as it ran
    shutil.copytree(resumed[0], out, ignore=shutil.ignore_patterns("points"))
    path = out / "sweep.json"
    result = runner.invoke(app, ["bench", str(setup / "model"), str(slim), "--backend", "onnx", "--batch-sizes", "1", "--rounds", "3",
                                 "--warmup", "1", "--sweep", str(path), "--label", "slim 2x"])
    assert result.exit_code == 0, result.output
    row = next(p for p in json.loads(path.read_text())["points"] if p["recipe"] == "slim 2x")
    assert row["source"] == "bench" and row["speedup"] > 0 and row["quality"] is None
    result = runner.invoke(app, ["eval", str(slim), "--data", str(setup / "data.txt"), "--sweep", str(path), "--label", "slim 2x"])
    assert result.exit_code == 0, result.output
    rows = [p for p in json.loads(path.read_text())["points"] if p["recipe"] == "slim 2x"]
    assert len(rows) == 1 and rows[0]["speedup"] == row["speedup"] and 0 < rows[0]["quality"]["embedding_cosine"] <= 1.0001
    assert "| slim 2x |" in (out / "sweep.md").read_text()
    result = runner.invoke(app, ["bench", str(setup / "model"), "--sweep", str(tmp_path / "missing.json")])
    assert_exit(result, 2, "does not exist")


def test_no_keep_models_keeps_only_the_report(setup, tmp_path):
    args = ["sweep", str(setup / "model"), "--recipe", "heads-a-star", "--data", str(setup / "data.txt"), "-o", str(tmp_path / "s"),
            "--no-keep-models", "--targets", "heads_count=3", *[a.removeprefix("heads-a-star.") for a in CHEAP[:6]], *CHEAP[-6:]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (point,) = json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]
    assert point["checkpoint"] is None and point["target_set"] == {"step": 0, "heads_count": 3}
    assert sorted(p.name for p in (tmp_path / "s" / "points" / "heads-a-star-heads_count=3").iterdir()) == ["report.json", "report.md"]


def test_frontier_on_hand_made_points():
    points = [
        (1.0, 1.0),  # the original: nothing is as good
        (1.5, 0.9), (1.5, 0.9),  # a tie: both on it
        (1.3, 0.85),  # slower and worse than (1.5, 0.9)
        (2.0, 0.7),  # the fastest
        (2.0, 0.6),  # as fast as (2.0, 0.7), worse
        (1.5, 0.8),  # as fast as (1.5, 0.9), worse
        (0.9, 0.99),  # slower and worse than the original
    ]
    assert frontier(points) == [True, True, True, False, True, False, False, False]
    assert frontier([]) == []


def test_targets_and_the_speedup_rule(tmp_path):
    assert [t.label for t in parse_targets("1.5, 2,heads_fraction=0.3,heads_count=4,2.0")] == ["1.5x", "2x", "heads_fraction=0.3", "heads_count=4"]
    assert [t.label for t in parse_targets(None)] == ["as written"]
    recipes = ["heads-a-star", "svd-kd", "l0-ffn", "layer-drop", "hidden-importance", "uniform-importance", "embedding-codes"]
    plans = plan_points(recipes, [], parse_targets("2,heads_fraction=0.25"))
    got = {(p.recipe, p.target.label): (p.target_set, p.skip is not None) for p in plans}
    assert got[("heads-a-star", "2x")] == ({"step": 0, "heads_fraction": 0.5}, False)
    assert got[("heads-a-star", "heads_fraction=0.25")] == ({"step": 0, "heads_fraction": 0.25}, False)
    assert got[("svd-kd", "2x")] == ({"step": 0, "params_fraction": 0.5}, False)
    assert got[("l0-ffn", "2x")] == ({"step": 0, "speedup": 2.0}, False)  # the method takes a speedup
    assert got[("layer-drop", "2x")] == ({"step": 0, "speedup": 2.0}, False)
    assert got[("hidden-importance", "2x")] == ({"step": 0, "hidden_fraction": 0.5}, False)
    assert got[("uniform-importance", "2x")] == ({"step": 0, "speedup": 2.0}, False)
    assert got[("svd-kd", "heads_fraction=0.25")][1] is True  # lowrank.svd has no heads_fraction: skipped
    assert got[("embedding-codes", "as written")] == (None, False)  # no target: once, as written
    assert [p.steps[0]["target"]["heads_fraction"] for p in plans if p.recipe == "heads-a-star"] == [0.5, 0.25]


@pytest.mark.parametrize("targets, message", [
    ("0.5", "must be above 1"), ("fast", "expected a speedup"), ("heads_fraction=nan", "finite"), ("bogus_key=0.3", "no recipe takes it"),
    ("heads_fraction=1.5", "heads_fraction"),
])
def test_bad_targets(setup, tmp_path, targets, message):
    result = runner.invoke(app, ["sweep", str(setup / "model"), "--recipe", "heads-a-star", "--targets", targets, "-o", str(tmp_path / "s")])
    assert_exit(result, 2, message)
    assert not (tmp_path / "s").exists()


def test_a_point_that_fails_is_recorded_and_the_sweep_goes_on(setup, tmp_path):
    """svd-kd at 2x on the tiny model asks for fewer parameters than rank 8 everywhere costs: bad
    input for that point, not for the sweep; a rerun does not retry it."""
    args = ["sweep", str(setup / "model"), "--recipe", "svd-kd", "--data", str(setup / "data.txt"), "-o", str(tmp_path / "s"),
            "--targets", "2,params_fraction=0.9", "--set", "steps.0.options.calibration_samples=8", "--set", "steps.1.options.max_steps=2",
            *CHEAP[-6:]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    points = {p["target"]: p for p in json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]}
    assert points["2x"]["status"] == "failed" and "rank" in points["2x"]["error"] and points["2x"]["exit_code"] == 2
    assert points["params_fraction=0.9"]["status"] == "done"
    assert "| svd-kd | 2x | failed: " in (tmp_path / "s" / "sweep.md").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "--retry-failed reruns it" in again.stderr and "all 2 points are in" in again.stderr
