"""domaintune.llm_export: merged and GGUF exports of causal LMs, each checked against the model.

The model is a tiny random Llama (hidden 32, 2 layers, grouped-query attention, RoPE theta
100000 as SmolLM2 has) with SmolLM2-135M-Instruct's real tokenizer and chat template, so
llama.cpp's converter recognises its pre-tokenizer. The GGUF is read back by transformers'
GGUF reader (not llama.cpp's runtime).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.errors import ExportError
from domaintune.llm_export import (
    converter_error,
    gguf_export,
    gguf_parity,
    gguf_supported,
    merged_export,
)

pytestmark = pytest.mark.slow

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
]


def build_tiny_smollm(out: Path, seed: int = 0) -> Path:
    """A tiny random Llama saved with SmolLM2-135M-Instruct's tokenizer (vocabulary size
    len(tokenizer), its special tokens, its chat template). Weights of std 0.2, not
    transformers' 0.02: with 0.02 the tied embeddings dominate and every greedy answer
    repeats the prompt's last token (agreement on such answers would prove nothing); with
    0.2 the answers differ from prompt to prompt and attention depends on the positions
    (RoPE)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from domaintune.models import resolve_pretrained

    tok = AutoTokenizer.from_pretrained(resolve_pretrained(SMOLLM2).path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_smollm(tmp_path_factory) -> Path:
    return build_tiny_smollm(tmp_path_factory.mktemp("tiny-smollm") / "model")


@pytest.fixture(scope="module")
def merged(tiny_smollm, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("merged") / "merged"
    return out, merged_export(tiny_smollm, out)


def no_partial_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_merged_model_folder_is_copied_with_its_tokenizer_and_chat_template(tiny_smollm, merged):
    out, info = merged
    assert info["merged"] is False
    assert info["dtype"] == "float32"
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(
        info["files"]
    )
    assert info["bytes"] == sum((out / f).stat().st_size for f in info["files"])
    assert (out / "model.safetensors").read_bytes() == (
        tiny_smollm / "model.safetensors"
    ).read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder
    assert gguf_supported(out) is None
    with pytest.raises(ExportError, match="exists and is not empty"):
        merged_export(tiny_smollm, out)


def test_gguf_f32_reads_back_with_the_same_logits_answers_and_tokens(merged, tmp_path):
    out, _ = merged
    gguf = gguf_export(out, tmp_path / "gguf", outtype="f32", filename="tiny.f32.gguf")
    assert gguf == tmp_path / "gguf" / "tiny.f32.gguf"
    assert no_partial_files(gguf.parent) == ["tiny.f32.gguf"]
    report = gguf_parity(out, gguf, PROMPTS, max_new_tokens=16, examples=len(PROMPTS))
    assert report["prompts"] == len(PROMPTS)
    # the converter permutes q/k for llama.cpp's RoPE layout and the reader undoes it: a
    # wrong permutation or RoPE theta moves these logits by far more than 1e-4
    assert report["max_abs_logit_diff"] <= 1e-4, report
    assert report["next_token_agreement"] == 1.0
    assert report["greedy_identical"] == 1.0, report["examples"]
    # not an agreement on empty or constant answers: each prompt gets its own answer
    assert min(report["answer_tokens"]) > 0
    assert len({e["model"] for e in report["examples"]}) == len(PROMPTS)
    assert all(e["model"] == e["gguf"] for e in report["examples"])
    assert report["tokenizer_identical"] and report["chat_template_identical"]


def test_a_lora_adapter_alone_is_merged_into_its_base(tiny_smollm, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.models import ResolvedModel

    base = AutoModelForCausalLM.from_pretrained(tiny_smollm, dtype=torch.float32)
    torch.manual_seed(1)  # random A and B: an adapter that changes the model
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        ),
    ).eval()
    adapter = tmp_path / "model"  # a registry version's layout (merge_on_export: false)
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_smollm).save_pretrained(adapter)
    base_info = {
        "name": str(tiny_smollm),
        "fingerprint": ResolvedModel(name="base", path=str(tiny_smollm)).fingerprint(),
        "strategy": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "merge_on_export": False}},
    }
    (adapter / "base_model.json").write_text(json.dumps(base_info))
    assert "merge it first" in gguf_supported(adapter)

    info = merged_export(adapter, tmp_path / "merged")
    assert info["merged"] is True and info["dtype"] == "float32"
    assert "model.safetensors" in info["files"] and "chat_template.jinja" in info["files"]
    assert not [f for f in info["files"] if f.startswith("adapter_")]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 28, 732, 506, 216, 34, 27, 34, 47]])
    with torch.inference_mode():
        want = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            without = peft_model(input_ids=ids).logits
        got = merged.eval()(input_ids=ids).logits
    assert float((want - without).abs().max()) > 1e-3  # the adapter matters
    assert float((got - want).abs().max()) <= 1e-5

    # inside a registered version (config.yaml beside model/): merged as chaining merges it
    import yaml

    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "task": {"type": "causal_lm"},
                "data": {"source": "a.txt"},
                "training": {"strategy": {"lora": {"r": 4, "alpha": 8, "merge_on_export": False}}},
            }
        )
    )
    info = merged_export(adapter, tmp_path / "merged-version")
    assert info["merged"] is True
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-version", dtype=torch.float32)
    with torch.inference_mode():
        assert float((again.eval()(input_ids=ids).logits - want).abs().max()) <= 1e-5

    # a base whose content changed since the adapter was trained is refused, on one line
    (adapter / "base_model.json").write_text(json.dumps({**base_info, "fingerprint": "0" * 64}))
    with pytest.raises(ExportError) as err:
        merged_export(adapter, tmp_path / "again")
    assert "has changed since" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "again").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_tokenizer_the_converter_does_not_know_is_one_line_and_leaves_no_file(
    tiny_causal_model, tmp_path
):
    out = tmp_path / "gguf"
    assert gguf_supported(tiny_causal_model) is None  # a Llama: refused by its tokenizer
    with pytest.raises(ExportError) as err:
        gguf_export(tiny_causal_model, out, outtype="f16", filename="home.gguf")
    message = str(err.value)
    assert "\n" not in message
    assert str(tiny_causal_model) in message
    assert "BPE pre-tokenizer was not recognized" in message
    assert no_partial_files(out) == []


def test_models_that_are_not_causal_lms_or_unknown_to_the_converter_are_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    bert = tmp_path / "bert"
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    BertForSequenceClassification(cfg).save_pretrained(bert)
    # llama.cpp's converter would write this classifier (as an embedding model)
    assert "not a causal language model" in gguf_supported(bert)
    with pytest.raises(ExportError, match="not a causal language model") as err:
        gguf_export(bert, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert no_partial_files(tmp_path / "out") == []

    gptj = tmp_path / "gptj"
    gptj.mkdir()
    (gptj / "config.json").write_text(json.dumps({"architectures": ["GPTJForCausalLM"]}))
    assert "has no model class for GPTJForCausalLM" in gguf_supported(gptj)
    with pytest.raises(ExportError, match="outtype 'q4_k'"):
        gguf_export(gptj, tmp_path / "out", outtype="q4_k")


def test_the_converter_error_line_is_the_last_exception_or_logged_error():
    tb = (
        "INFO:hf-to-gguf:Loading model: m\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "FileNotFoundError: Cannot find Llama BPE tokenizer\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        "NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()\n"
    )
    assert converter_error(tb) == (
        "NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"
    )
    assert converter_error("INFO:hf-to-gguf:x\nERROR:hf-to-gguf:Model Foo is not supported\n") == (
        "Model Foo is not supported"
    )
    assert converter_error("") == "no output"
