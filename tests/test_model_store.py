"""Model resolution and the atomic preparation of the embedded default checkpoint."""
import pytest

from streamsink import model_store
from streamsink.model_store import ModelNotFoundError, resolve_model


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMSINK_CACHE", str(tmp_path))
    return tmp_path


def _fake_checkpoint(gguf, out_dir):
    (out_dir / "config.json").write_text("{}")


def test_interrupted_preparation_leaves_nothing_trusted(private_cache, monkeypatch):
    def dies_halfway(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_store, "_dequantize_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        model_store.prepare_default_model(progress=False)
    models = private_cache / "models"
    assert not model_store.default_model_dir().exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []

    # The next run prepares it properly.
    monkeypatch.setattr(model_store, "_dequantize_gguf", _fake_checkpoint)
    path = model_store.prepare_default_model(progress=False)
    assert (path / "config.json").exists()


def test_untrusted_directory_is_rebuilt(private_cache, monkeypatch):
    stale = model_store.default_model_dir()
    stale.mkdir(parents=True)
    (stale / "config.json").write_text('{"half": true}')  # no completion marker
    monkeypatch.setattr(model_store, "_dequantize_gguf", _fake_checkpoint)
    path = model_store.prepare_default_model(progress=False)
    assert (path / "config.json").read_text() == "{}"


def test_prepared_model_is_reused(private_cache, monkeypatch):
    monkeypatch.setattr(model_store, "_dequantize_gguf", _fake_checkpoint)
    first = model_store.prepare_default_model(progress=False)

    def must_not_run(gguf, out_dir):
        raise AssertionError("prepared twice")

    monkeypatch.setattr(model_store, "_dequantize_gguf", must_not_run)
    assert model_store.prepare_default_model(progress=False) == first


def test_local_directory_and_hub_id(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"


@pytest.mark.parametrize("bad", ["/no/such/dir", "./missing-model", "a/b/c"])
def test_missing_path_is_refused(bad):
    with pytest.raises(ModelNotFoundError, match=bad):
        resolve_model(bad)


def test_directory_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
