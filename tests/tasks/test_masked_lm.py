"""masked_lm: documents packed into blocks with their special tokens, whole-word masking,
fixed test masks, masked-token perplexity and accuracy before and after through the real flow,
and a classifier that starts from the result with a fresh head."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from domaintune.errors import ContractViolation
from domaintune.storage.store import Store
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.validate import validate
from tests.conftest import merge_sections, write_csv, write_jsonl


def mlm_config(make_config, source, **over):
    sections = {"task": {"type": "masked_lm"}, "training": {"max_length": 32}}
    return make_config(source, **merge_sections(sections, over))


def docs(rows, n=20):
    return [{"text": f"{r['text']}\n\nThe {r['label']} note ends here."} for r in rows(n)]


def test_blocks_keep_special_tokens_and_test_masks_are_fixed(
    tmp_path, make_config, rows, tiny_model
):
    from domaintune.loading import load_for_scoring
    from domaintune.tasktypes import get_task_type
    from domaintune.tasktypes.masked_lm import masking_collator

    src = write_jsonl(tmp_path / "corpus.jsonl", docs(rows))
    cfg = mlm_config(make_config, src)
    assert cfg.evaluation.primary_metric == "perplexity"
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    splits = preprocess(cfg, raw, store)
    task = get_task_type("masked_lm")
    tok, model, _ = load_for_scoring(str(tiny_model), "masked_lm", [], cfg.training)
    test = splits.splits["test"]
    blocks = pd.read_parquet(test.path)
    assert "labels" not in blocks.columns, "the collator draws the labels"
    assert blocks["input_ids"].map(len).eq(32).all()
    ids = np.concatenate(blocks["input_ids"].to_list())
    assert (ids == tok.cls_token_id).sum() == (ids == tok.sep_token_id).sum() == test.rows

    # whole-word masking: every piece of a masked word, each as the mask token
    collate = masking_collator(tok, cfg.task, seed=1)
    words = tok(["unprofitable quarterly underperformance " * 6], return_tensors="pt")
    inputs, labels = collate.torch_mask_tokens(words["input_ids"].clone())
    pieces = tok.convert_ids_to_tokens(words["input_ids"][0])
    masked = (labels[0] != -100).tolist()
    assert any(masked) and (inputs[0][labels[0] != -100] == tok.mask_token_id).all()
    for i, piece in enumerate(pieces):
        if piece.startswith("##"):
            assert masked[i] == masked[i - 1], f"{pieces[i - 1]} {piece} masked apart"
    assert not any(m for m, p in zip(masked, pieces, strict=True) if p in ("[CLS]", "[SEP]"))

    # the test split is masked once: the same metrics again, at any batch size
    first, per_block = task.score_split(model, tok, test.path, [], 4, settings=cfg.task)
    again, _ = task.score_split(model, tok, test.path, [], 64, settings=cfg.task)
    assert first == again and first["masked_tokens"] > 0
    assert per_block["masked_tokens"].sum() == first["masked_tokens"]
    token_level = cfg.task.model_copy(update={"whole_word_masking": False})
    other, _ = task.score_split(model, tok, test.path, [], 4, settings=token_level)
    assert other != first

    # how training masks is part of what it learns: in the finetune key and in the collator
    # the worker builds from the run's task section
    from domaintune.config import TaskConfig
    from domaintune.tasks import finetune as finetune_stage

    key = finetune_stage.plan(cfg, splits)[0]
    for change in ({"mlm_probability": 0.3}, {"whole_word_masking": False}):
        changed = cfg.model_copy(update={"task": cfg.task.model_copy(update=change)})
        assert finetune_stage.plan(changed, splits)[0] != key, change
    worker_side = task.collator(tok, TaskConfig.model_validate({**cfg.task.model_dump(mode="json"), "mlm_probability": 0.3}))  # fmt: skip
    assert worker_side.mlm_probability == 0.3


def test_contract_rejects_a_blank_document(tmp_path, make_config, rows):
    src = write_jsonl(tmp_path / "corpus.jsonl", [*docs(rows, 4), {"text": "   "}])
    cfg = mlm_config(make_config, src)
    store = Store(cfg.store.root)
    with pytest.raises(ContractViolation) as e:
        validate(cfg, ingest(cfg, store), store)
    line = next(x for x in str(e.value).splitlines() if "text_not_blank" in x)
    assert "corpus.jsonl row 13" in line, line  # one line: the rule, the file and row


def test_mlm_probability_is_a_share(make_config, tmp_path):
    from domaintune.errors import ConfigError

    with pytest.raises(ConfigError, match="task.mlm_probability"):
        mlm_config(make_config, tmp_path / "x.jsonl", task={"mlm_probability": 1.0})


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_masked_lm_flow_adapts_and_a_classifier_starts_from_it(
    tmp_path, make_config, rows, tiny_model
):
    import torch
    from transformers import AutoModelForMaskedLM

    from domaintune.flows.retrain import retrain
    from domaintune.tasks.evaluate import evaluate
    from domaintune.tasks.finetune import finetune

    src = write_jsonl(tmp_path / "corpus.jsonl", docs(rows, 40))
    # a gentler rate than the tiny tests' 5e-3, which collapses the never-masked [CLS] state
    cfg = mlm_config(make_config, src, training={"learning_rate": 1e-3})
    summary = retrain(cfg)
    m = summary["metrics"]
    assert m["primary_metric"] == "perplexity"
    assert m["finetuned"]["perplexity"] < m["base"]["perplexity"], m
    assert m["finetuned"]["masked_accuracy"] > m["base"]["masked_accuracy"], m
    assert summary["version"] == "v0001" and summary["promoted"], summary["promotion_reason"]
    net = AutoModelForMaskedLM.from_pretrained(summary["model_dir"])
    assert type(net).__name__ == "BertForMaskedLM"
    source = AutoModelForMaskedLM.from_pretrained(str(tiny_model))
    assert not torch.equal(
        net.bert.embeddings.word_embeddings.weight, source.bert.embeddings.word_embeddings.weight
    ), "the encoder itself was adapted"
    from domaintune.serving.predict import PredictError, predict

    with pytest.raises(PredictError, match="does not support task type 'masked_lm'"):
        predict("test-uc@v0001", [str(src)], str(tmp_path / "p.csv"), store=Store(cfg.store.root))

    # the next stage: a classifier from the registered encoder, with a fresh head. 40 rows a
    # class (24 test rows): with 20 (12 test rows, steps of 0.083) the tiny encoder, whose
    # never-masked [CLS] state barely varies after MLM, learned too little in 40 steps to
    # clear the bar for most seeds; with 40 it reached 0.667 for seeds 0 to 3 alike
    clf = make_config(
        write_csv(tmp_path / "reviews.csv", rows(40)),
        name="reviews",
        model={"name_or_path": "registry://test-uc@v0001"},
    )
    store = Store(clf.store.root)
    splits = preprocess(clf, ingest(clf, store), store)
    model = finetune(clf, splits, store)
    report = evaluate(clf, splits, model, store)
    assert report.finetuned["accuracy"] >= report.base["accuracy"] + 0.2, report.finetuned
