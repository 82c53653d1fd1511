"""causal_lm: documents packed into blocks, perplexity before and after, through the real flow."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from domaintune.errors import ContractViolation
from domaintune.storage.store import Store
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.validate import validate
from tests.conftest import merge_sections, write_jsonl


def lm_config(make_config, source, model, **over):
    sections = {
        "task": {"type": "causal_lm"},
        "model": {"name_or_path": str(model)},
        "training": {"max_length": 32},
    }
    return make_config(source, **merge_sections(sections, over))


def docs(rows, n=20):
    return [{"text": f"{r['text']}\n\nThe {r['label']} note ends here."} for r in rows(n)]


def test_documents_are_packed_into_full_blocks_with_eos_between_them(
    tmp_path, make_config, rows, tiny_causal_model
):
    from transformers import AutoTokenizer

    src = write_jsonl(tmp_path / "corpus.jsonl", docs(rows))
    cfg = lm_config(make_config, src, tiny_causal_model)
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    assert raw.labels == [] and raw.label_counts["documents"] == 60
    splits = preprocess(cfg, raw, store)
    tok = AutoTokenizer.from_pretrained(tiny_causal_model)
    for name, info in splits.splits.items():
        blocks = pd.read_parquet(info.path)
        assert blocks["input_ids"].map(len).eq(32).all(), "every block is max_length long"
        ids = np.concatenate(blocks["input_ids"].to_list())
        mask = np.concatenate(blocks["attention_mask"].to_list())
        labels = np.concatenate(blocks["labels"].to_list())
        assert (ids[mask == 1] == tok.eos_token_id).sum() == info.rows, "one EOS per document"
        assert (labels[mask == 0] == -100).all() and (labels[mask == 1] == ids[mask == 1]).all()
        assert mask[:-32].all(), "only the last block holds padding"
        packing = splits.stats[f"{name}_packing"]
        assert packing["packing_efficiency"] == pytest.approx(mask.mean(), abs=1e-4)
        assert 0.5 < packing["packing_efficiency"] <= 1.0
        # every block is max_length long, yet no text was cut: nothing is truncated
        assert splits.stats[f"{name}_tokens"]["truncated_share"] == 0.0


def test_contract_rejects_blank_and_too_few_documents(
    tmp_path, make_config, rows, tiny_causal_model
):
    corpus = docs(rows, 2)[:5] + [{"text": "   "}]
    src = write_jsonl(tmp_path / "thin.jsonl", corpus)
    cfg = lm_config(make_config, src, tiny_causal_model)
    store = Store(cfg.store.root)
    with pytest.raises(ContractViolation) as e:
        validate(cfg, ingest(cfg, store), store)
    msg = str(e.value)
    assert "text_not_blank" in msg and "thin.jsonl row 6" in msg
    assert "enough_documents" in msg


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_causal_lm_flow_lowers_perplexity_and_promotes(
    tmp_path, make_config, rows, tiny_causal_model
):
    from domaintune.flows.retrain import retrain

    src = write_jsonl(tmp_path / "corpus.jsonl", docs(rows, 40))
    summary = retrain(lm_config(make_config, src, tiny_causal_model))
    m = summary["metrics"]
    assert m["primary_metric"] == "perplexity"
    assert m["finetuned"]["perplexity"] < m["base"]["perplexity"], m
    assert summary["promoted"], summary["promotion_reason"]

    # predict from the registry: perplexity per document, what transformers' own loss gives
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.loading import autocast_for
    from domaintune.serving.predict import predict
    from domaintune.training.launch import inference_precision

    cfg = lm_config(make_config, src, tiny_causal_model)
    short = "profit record gain for the company"
    long = " ".join(["the market rose on strong growth"] * 40)  # several blocks of max_length
    write_jsonl(tmp_path / "new.jsonl", [{"text": short}, {"text": long}])
    out = tmp_path / "ppl.csv"
    done = predict("test-uc@production", [str(tmp_path / "new.jsonl")], str(out),
                   store=Store(cfg.store.root))  # fmt: skip
    got = pd.read_csv(out)
    model_dir = done["model_dir"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(short, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert got["perplexity_tokens"].iloc[0] == len(ids) - 1  # the first token has no context
    n_long = len(tok(long, add_special_tokens=False)["input_ids"]) + 1
    blocks = -(-n_long // cfg.training.max_length)
    assert blocks > 1 and got["perplexity_tokens"].iloc[1] == n_long - blocks
    net = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode(), autocast_for(net, inference_precision(cfg.training)[0]):
        loss = net(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.float()
    assert got["perplexity"].iloc[0] == pytest.approx(float(torch.exp(loss)), rel=2e-2)
    assert done["counts"] == {"documents": 2, "tokens": int(got["perplexity_tokens"].sum())}
