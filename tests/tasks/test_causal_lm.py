"""causal_lm: documents packed into blocks, perplexity before and after, through the real flow."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from domaintune.errors import ContractViolation
from domaintune.store import Store
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
