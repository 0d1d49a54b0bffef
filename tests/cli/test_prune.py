"""`shrink prune` end to end on a tiny model, and every bad input of the prune issue."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from shrink import registry, surgery
from shrink.cli import app
from shrink.models.hub import load_model

from helpers import (
    FAST,
    SENTENCES,
    assert_exit,
    write_model_and_data,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_model_and_data(tmp_path_factory.mktemp("prune"))


def prune(setup, out, *extra):
    args = ["prune", str(setup / "model"), "--recipe", "heads-a-star", "--data", str(setup / "data.txt"), "-o", str(out), "--no-export"]
    return runner.invoke(app, [*args, *FAST, *map(str, extra)])


def test_prune_writes_a_slim_checkpoint_and_report(setup, tmp_path):
    out = tmp_path / "slim"
    result = prune(setup, out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sum(report["after"]["heads_per_layer"]) == 12 - 5
    assert report["steps"][0]["stats"]["heads_removed"] == 5
    assert report["steps"][0]["stats"]["nodes_expanded"] >= 1
    assert {"before", "after"} <= set(report["quality"])
    for name in ("config.json", "model.safetensors", "modeling_shrink.py", "report.json", "report.md", "tokenizer.json"):
        assert (out / name).exists(), name
    slim = load_model(str(out))
    assert surgery.heads_per_layer(slim) == report["after"]["heads_per_layer"]
    assert "heads.a_star" in (out / "report.md").read_text()


def test_same_seed_same_model(setup, tmp_path):
    assert prune(setup, tmp_path / "a").exit_code == 0
    assert prune(setup, tmp_path / "b").exit_code == 0
    a, b = load_model(str(tmp_path / "a")), load_model(str(tmp_path / "b"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_unknown_recipe_suggests(setup, tmp_path):
    result = runner.invoke(app, ["prune", str(setup / "model"), "--recipe", "heads-a-str", "-o", str(tmp_path / "o")])
    assert_exit(result, 2, "unknown recipe", "heads-a-star")


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nsteps: [\n", "malformed YAML"),
        ("name: x\nsteps:\n  - method: heads.nope\n", "unknown method"),
        ("name: x\nsteps:\n  - method: heads.a_star\n    target: {heads_count: 2}\n    options: {branching: lots}\n", "steps.0.options.branching"),
        ("name: x\nsteps:\n  - method: heads.a_star\n    target: {heads_fraction: 1.2}\n", "steps.0.target.heads_fraction"),
    ],
)
def test_bad_recipe_files(setup, tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    result = runner.invoke(app, ["prune", str(setup / "model"), "--recipe", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
    assert_exit(result, 2, message)
    assert not (tmp_path / "o").exists()


def test_more_heads_than_the_model_has(setup, tmp_path):
    result = prune(setup, tmp_path / "o", "--set", "steps.0.target={heads_count: 13}")
    assert_exit(result, 2, "heads_count 13")


def test_recipe_that_needs_labels_on_unlabeled_data(setup, tmp_path, monkeypatch):
    registry.all_methods()

    @registry.register("test.needs_labels", options=registry.NoTarget, needs_labels=True)
    def needs_labels(ctx, target, options):
        raise AssertionError("must not run")

    monkeypatch.setitem(registry.METHODS, "test.needs_labels", registry.METHODS["test.needs_labels"])
    (tmp_path / "r.yaml").write_text("name: labelled\nsteps:\n  - method: test.needs_labels\n")
    result = runner.invoke(app, ["prune", str(setup / "model"), "--recipe", str(tmp_path / "r.yaml"), "--data", str(setup / "data.txt"), "-o", str(tmp_path / "o")])
    registry.METHODS.pop("test.needs_labels", None)
    assert_exit(result, 2, "needs labeled data")


def test_existing_non_empty_output_is_refused_and_untouched(setup, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert_exit(prune(setup, out), 2, "not empty", "--overwrite")
    assert (out / "mine.txt").read_text() == "keep"


def test_ctrl_c_leaves_no_output(setup, tmp_path, monkeypatch):
    import shrink.prune.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shrink.prune.pipeline, "write_prune_report", interrupted)
    result = prune(setup, tmp_path / "o")
    assert result.exit_code == 130
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory


def test_quality_gate_exits_1_after_writing(setup, tmp_path):
    result = prune(setup, tmp_path / "o", "--max-quality-drop", "0")
    assert_exit(result, 1, "threshold failed", "embedding_cosine dropped")
    assert (tmp_path / "o" / "report.json").exists()


def test_quality_gate_on_neighbour_recall(setup, tmp_path):
    result = prune(setup, tmp_path / "o", "--max-quality-drop", "1", "--quality-metric", "neighbour_recall", "--json")
    assert result.exit_code == 0, result.output
    after = json.loads(result.stdout)["quality"]["after"]
    assert 0 <= after["neighbour_recall"] <= 1 and after["neighbour_k"] >= 1
    assert_exit(prune(setup, tmp_path / "p", "--quality-metric", "recall"), 2, "not a quality figure", "neighbour_recall")


def test_speedup_gate_without_export(setup, tmp_path):
    assert_exit(prune(setup, tmp_path / "o", "--min-speedup", "1.5"), 1, "no speedup was measured")


def test_eval_data_file_is_the_held_out_set(setup, tmp_path):
    (tmp_path / "held.txt").write_text("a fox and an owl met.\nrain fell on the mat.\nthe sun came out.\n")
    result = prune(setup, tmp_path / "o", "--eval-data", tmp_path / "held.txt", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["eval_examples"] == 3 and report["calibration_examples"] == len(SENTENCES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_a_clear_error(setup, tmp_path):
    assert_exit(prune(setup, tmp_path / "o", "--device", "cuda"), 2, "CUDA is not available")


def test_int8_prune_times_dense_and_slim_fp32_and_int8_in_one_run(tmp_path):
    """--int8: model-int8.onnx next to model.onnx, four models in one interleaved bench, and the
    speedups each against dense fp32 and dense int8 derived from that one run."""
    import transformers as T

    from helpers import tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    model = T.BertModel(tiny_config("bert", max_position_embeddings=160)).eval()  # the bench uses 128 tokens
    model.config.architectures = ["BertModel"]
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "data.txt").write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(tmp_path / "model"), "--recipe", "heads-a-star", "--data", str(tmp_path / "data.txt"),
                                 "-o", str(out), "--int8", "--json", *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (out / "model.onnx").is_file() and (out / "model-int8.onnx").is_file()
    models = report["onnx"]["bench"]["models"]
    assert len(models) == 4
    p50 = [m["results"][0]["p50_ms"] for m in models]
    int8 = report["onnx"]["int8"]
    assert int8["speedup"]["slim_int8_vs_dense_int8"] == round(p50[2] / p50[3], 3)
    assert int8["speedup"]["slim_fp32_vs_dense_fp32"] == round(p50[0] / p50[1], 3)
    assert int8["export"]["int8_settings"]["per_channel"] is True
    assert 0 < int8["quality"]["slim"]["embedding_cosine"] <= 1.0001
    assert "int8 speedup vs dense fp32" in (out / "report.md").read_text()


def test_int8_without_export_is_refused(setup, tmp_path):
    result = runner.invoke(app, ["prune", str(setup / "model"), "--recipe", "heads-a-star", "-o", str(tmp_path / "o"), "--int8", "--no-export"])
    assert_exit(result, 2, "--int8 needs the ONNX export")


# --- issue 16: all the calibration split by default; --budget ----------------------------------------

WITHOUT_CAP = [a for i, a in enumerate(FAST) if "--max-samples" not in FAST[max(0, i - 1) : i + 1]]


def test_training_uses_the_whole_calibration_split_by_default(setup, tmp_path):
    args = ["prune", str(setup / "model"), "--recipe", "heads-a-star", "--data", str(setup / "data.txt"), "--no-export", "--json",
            *WITHOUT_CAP, "--set", "steps.1.options.max_steps=50"]
    assert "--max-samples" not in WITHOUT_CAP and len(WITHOUT_CAP) == len(FAST) - 2
    everything = json.loads(runner.invoke(app, [*args, "-o", str(tmp_path / "a")]).stdout)
    # 40 sentences, 20% held out: all 32 others train (2 batches of 16: 2 steps of one epoch)
    assert everything["calibration_examples"] == everything["training_examples"] == 32
    assert everything["steps"][1]["stats"]["distill"]["steps"] == 2
    capped = json.loads(runner.invoke(app, [*args, "--max-samples", "16", "-o", str(tmp_path / "b")]).stdout)
    assert capped["training_examples"] == 16 and capped["steps"][1]["stats"]["distill"]["steps"] == 1
    assert "budget" not in everything and "budget" not in everything["steps"][1]


def test_budget_that_fits_is_reported(setup, tmp_path):
    result = prune(setup, tmp_path / "o", "--budget", "10m", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["budget"]["seconds"] == 600 and not report["budget"]["shortened"]
    assert "budget" not in report["steps"][0]  # heads.a_star only scores: no share of the budget
    run = report["steps"][1]["budget"]["runs"][0]
    assert report["steps"][1]["budget"]["share_s"] == 600 and run["label"] == "distill" and run["steps"] == run["planned_steps"] == 1
    assert report["budget"]["trades"] == [f"heads-a-star / distill: {run['trade']}"]
    assert "Budget: 10 min of training" in (tmp_path / "o" / "report.md").read_text()


def test_budget_too_small_shortens_training_and_says_what_it_traded(setup, tmp_path):
    result = prune(setup, tmp_path / "o", "--set", "steps.1.options.epochs=30", "--set", "steps.1.options.max_steps=30",
                   "--budget", "0.001s", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    run = report["steps"][1]["budget"]["runs"][0]
    assert run["planned_steps"] == 30 and run["steps"] == 3 and run["shortened"]  # stops after the probe steps
    assert report["steps"][1]["stats"]["distill"]["steps"] == 3 and report["budget"]["shortened"]
    assert "3 of 30 epochs over 16 examples (3 of 30 steps, budget 0.001 s)" == run["trade"]
    assert "30 steps do not fit in the budget" in result.stderr
    shown = prune(setup, tmp_path / "p", "--set", "steps.1.options.epochs=30", "--set", "steps.1.options.max_steps=30", "--budget", "0.001s")
    assert shown.exit_code == 0 and "distill: " in shown.stdout and "(trained 3 of 30 epochs" in shown.stdout, shown.stdout


@pytest.mark.parametrize("value", ["abc", "10x", "0", "-3m", "nan"])
def test_bad_budget_is_one_line_exit_2_before_any_work(setup, tmp_path, value):
    assert_exit(prune(setup, tmp_path / "o", "--budget", value), 2, "--budget")
    assert not (tmp_path / "o").exists()


def test_budget_shares_among_training_steps(setup, tmp_path):
    """Each training step gets what is left / the training steps left, with its min_train_fraction."""
    from shrink.train import loop

    registry.all_methods()
    seen = []

    @registry.register("test.trains", options=registry.NoTarget, trains=True, min_train_fraction=lambda options: 0.25)
    def trains(ctx, target, options):
        scope = loop._SCOPE.get()
        seen.append((scope.seconds, scope.min_fraction))
        scope.spent += 30  # as if its train() ran 30 s
        return registry.StepResult()

    @registry.register("test.scores", options=registry.NoTarget)
    def scores(ctx, target, options):
        seen.append(loop._SCOPE.get())
        return registry.StepResult()

    (tmp_path / "r.yaml").write_text("name: shares\nsteps:\n  - method: test.trains\n  - method: test.scores\n  - method: test.trains\n")
    try:
        result = runner.invoke(app, ["prune", str(setup / "model"), "--recipe", str(tmp_path / "r.yaml"), "--data", str(setup / "data.txt"),
                                     "-o", str(tmp_path / "o"), "--no-export", "--budget", "100s", "--json", "--max-samples", "8"])
    finally:  # registered for this test only
        for name in ("test.trains", "test.scores"):
            registry.METHODS.pop(name, None)
    assert result.exit_code == 0, result.output
    assert seen == [(50, 0.25), None, (70, 0.25)]
    assert json.loads(result.stdout)["budget"]["training_s"] == 60


def test_budget_cut_l0_still_anneals_to_its_target(setup, tmp_path):
    """l0 keeps one step past its target_warmup (0.5) of the planned steps: the annealed target has
    reached the final fraction when a budget stops it."""
    args = ["prune", str(setup / "model"), "--recipe", "l0-structured", "--data", str(setup / "data.txt"), "-o", str(tmp_path / "o"),
            "--set", "steps.0.target={params_fraction: 0.5}", "--set", "steps.0.options.epochs=30", "--set", "steps.0.options.max_steps=30",
            "--set", "steps.1.options.max_steps=2", "--max-samples", "16", "--eval-samples", "8", "--max-length", "32", "--no-export",
            "--budget", "0.001s", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    run = report["steps"][0]["budget"]["runs"][0]
    assert (run["label"], run["planned_steps"], run["steps"], run["min_steps"]) == ("l0 gates", 30, 16, 16) and run["over_budget"]
    stats = report["steps"][0]["stats"]
    assert stats["training"]["log"][-1]["step"] == 15 and stats["training"]["log"][-1]["target"] == 0.5
    assert stats["achieved_fraction"] <= 0.5
    assert report["steps"][1]["budget"]["share_s"] == 0  # l0 used it all: distill runs its planned steps (2, under the probe)
