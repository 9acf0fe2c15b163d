"""The lab's base model: built once into the cache (atomically), identical weights on every build."""

import pytest

import alignkit.lab.base as base


@pytest.fixture
def small_pretraining(monkeypatch):
    monkeypatch.setitem(base.PRETRAIN, "lines", 400)  # 50 steps: the mechanics, not the quality


def test_base_model_is_built_once_then_read_from_the_cache(tmp_path, small_pretraining, monkeypatch):
    path = base.base_model(tmp_path, quiet=True)
    assert path == tmp_path / f"lab-base-v{base.BASE_VERSION}"
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary folder left behind

    def fail(*a, **k):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(base, "pretrain", fail)
    assert base.base_model(tmp_path) == path
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    assert base.base_model() == path


def test_an_interrupted_build_leaves_no_model_behind(tmp_path, small_pretraining, monkeypatch):
    def crash(work, quiet=False):
        (work / "final").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(base, "pretrain", crash)
    with pytest.raises(KeyboardInterrupt):
        base.base_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_two_builds_give_identical_weights(tmp_path, small_pretraining):
    from safetensors.torch import load_file

    a = load_file(base.base_model(tmp_path / "a", quiet=True) / "model.safetensors")
    b = load_file(base.base_model(tmp_path / "b", quiet=True) / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
