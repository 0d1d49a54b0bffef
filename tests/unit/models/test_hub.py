"""Model reference resolution, offline."""

from __future__ import annotations

import pytest

from shrink.errors import BadInputError, ModelNotFoundError
from shrink.models import hub

from helpers import tiny_model


def test_aliases_resolve_to_hub_ids():
    assert hub.resolve("bert-base") == "google-bert/bert-base-uncased"
    assert hub.resolve("roberta-base") == "FacebookAI/roberta-base"
    assert hub.resolve("distilbert-base") == "distilbert/distilbert-base-uncased"
    assert hub.resolve("org/some-model") == "org/some-model"  # any hub id passes through


def test_local_directory_wins_over_alias(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_model("bert").save_pretrained(tmp_path / "bert-base")
    assert hub.resolve("bert-base") == "bert-base"


def test_paths_that_do_not_exist_are_not_sent_to_the_hub(tmp_path):
    for ref in ("./missing", str(tmp_path / "x"), "a/b/c", "~/nowhere"):
        with pytest.raises(ModelNotFoundError, match="does not exist"):
            hub.resolve(ref)


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(BadInputError, match="is a file"):
        hub.resolve(str(tmp_path / "f.txt"))


@pytest.mark.parametrize("task", ["base", "seq", "tok", "qa", "mlm"])
def test_task_head_class_survives_loading(task, tmp_path):
    model = tiny_model("electra", task=task)
    model.save_pretrained(tmp_path)
    loaded = hub.load_model(str(tmp_path))
    assert type(loaded) is type(model)


def test_packaged_alias_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setitem(hub.PACKAGED, "ghost", ("no_such_module_xyz", "pip install ghost"))
    with pytest.raises(ModelNotFoundError, match="not installed") as info:
        hub.resolve("ghost")
    assert info.value.hint == "pip install ghost"
