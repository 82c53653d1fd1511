"""Strategies: what trains, proven by comparing weights before and after real DeepSpeed runs.

The fast tests check the per-architecture parameter map (BERT, GPT-2, Llama), the optimizer
groups and the pre-flight errors on models built in memory. The slow ones train a few steps
through the real launcher (one rank without the ZeRO engine, two gloo ranks under ZeRO-2, and
ZeRO-3 cases with partial freezing and LoRA) and compare every saved tensor with the base
model's: exactly the intended ones changed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from domaintune.errors import ConfigError
from domaintune.storage.store import Store
from domaintune.tasks.evaluate import evaluate
from domaintune.tasks.finetune import finetune
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.tasks.register import register
from domaintune.tasktypes import get_task_type
from domaintune.training import strategies
from tests.conftest import LABELS, write_csv, write_jsonl


def _tiny(kind: str, task: str = "text_classification"):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    cfg = {
        "bert": BertConfig(
            vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64,
        ),
        "gpt2": GPT2Config(vocab_size=120, n_embd=32, n_layer=3, n_head=2, n_positions=64),
        "llama": LlamaConfig(
            vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
    }[kind]  # fmt: skip
    torch.manual_seed(0)
    return get_task_type(task).model_from_config(cfg, LABELS)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _strategy(value):
    from domaintune.config import StrategyConfig

    return StrategyConfig.model_validate(value)


# ------------------------------------------------------------------------- fast checks


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize(
    "task", ["text_classification", "token_classification", "question_answering", "causal_lm"]
)
def test_every_parameter_has_a_component_and_a_depth(arch, task):
    if arch == "bert" and task == "causal_lm":
        pytest.skip("BERT is not a causal LM")
    model = _tiny(arch, task)
    pmap = strategies.parameter_map(model)
    assert pmap.resolved_by == "table" and pmap.num_layers == 3
    assert all(p.components <= set(strategies.COMPONENTS) for p in pmap.params)
    assert sum(p.numel for p in pmap.params) == sum(p.numel() for p in model.parameters())
    counts = strategies.component_counts(pmap)
    assert {"embeddings", "attention", "feed_forward", "layer_norm", "head"} <= set(counts)
    depths = {p.depth for p in pmap.params}
    assert depths == {0, 1, 2, 3, 4}


def test_components_are_resolved_per_architecture():
    bert = {n: p for p in strategies.parameter_map(_tiny("bert")).params for n in p.names}
    assert bert["bert.encoder.layer.0.attention.output.dense.weight"].components == {"attention"}
    assert bert["bert.encoder.layer.0.attention.output.LayerNorm.weight"].components == {
        "layer_norm"
    }
    assert bert["bert.encoder.layer.2.output.dense.weight"].components == {"feed_forward"}
    assert bert["bert.embeddings.LayerNorm.weight"].depth == 0
    assert bert["bert.pooler.dense.weight"].components == {"head"}
    gpt2 = {
        n: p for p in strategies.parameter_map(_tiny("gpt2", "causal_lm")).params for n in p.names
    }
    assert gpt2["transformer.h.1.attn.c_attn.weight"].components == {"attention"}
    assert gpt2["transformer.h.1.mlp.c_fc.weight"].components == {"feed_forward"}
    assert gpt2["transformer.ln_f.weight"].components == {"layer_norm"}
    assert gpt2["transformer.ln_f.weight"].depth == 4
    llama = strategies.parameter_map(_tiny("llama", "causal_lm"))
    tied = next(p for p in llama.params if "lm_head.weight" in p.names)
    assert tied.components == {"embeddings", "head"} and "model.embed_tokens.weight" in tied.names
    names = {n: p for p in llama.params for n in p.names}
    assert names["model.layers.2.mlp.down_proj.weight"].components == {"feed_forward"}
    assert names["model.layers.0.input_layernorm.weight"].no_decay


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("full", r".*"),
        ("head_only", r"^(classifier|bert\.pooler)\."),
        ({"last_n_layers": 1}, r"^(classifier|bert\.pooler|bert\.encoder\.layer\.2)\."),
        (
            {"components": ["attention", "layer_norm"]},
            r"(\.attention\.|LayerNorm)",
        ),
        ({"kind": "full", "freeze_embeddings": True}, r"^(?!bert\.embeddings\.\w+_embeddings)"),
    ],
)
def test_each_strategy_selects_exactly_its_parameters(strategy, expected):
    model = _tiny("bert")
    names = {n for n, _ in model.named_parameters()}
    model, report = strategies.apply_strategy(model, _strategy(strategy), "text_classification")
    assert _trainable(model) == {n for n in names if re.search(expected, n)}
    assert report.trainable_parameters == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def _batch(task: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 23, 42, 8, 9], [7, 11, 13, 19, 29, 31]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "text_classification":
        batch["labels"] = torch.tensor([0, 2])
    elif task == "token_classification":
        batch["labels"] = torch.tensor([[0, 1, 2, 0, -100, 1], [2, 2, 1, 0, 0, -100]])
    elif task == "question_answering":
        batch.update(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([2, 4]))
    else:
        batch["labels"] = ids.clone()
    return batch


@pytest.mark.parametrize(
    "task",
    [
        "text_classification",
        "token_classification",
        "question_answering",
        "causal_lm",
        "instruction_tuning",
        "masked_lm",
    ],
)
@pytest.mark.parametrize(
    "strategy",
    ["head_only", {"last_n_layers": 1}, {"components": ["feed_forward", "layer_norm"]}, "lora"],
    ids=["head_only", "last_n_layers", "components", "lora"],
)
def test_every_strategy_trains_every_task_type(task, strategy):
    """One backward pass: gradients reach exactly the parameters the strategy left trainable."""
    arch = "llama" if task in ("causal_lm", "instruction_tuning") else "bert"
    model = _tiny(arch, task)
    model, report = strategies.apply_strategy(model, _strategy(strategy), task)
    model.train()
    model(**_batch(task)).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= _trainable(model)
    assert report.trainable_parameters < report.total_parameters


def test_lora_trains_adapters_and_the_new_head_only():
    model = _tiny("bert")
    model, report = strategies.apply_strategy(
        model, _strategy({"lora": {"r": 4}}), "text_classification"
    )
    trainable = _trainable(model)
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    adapted = {
        n.split(".lora_")[0].split("base_model.model.")[-1] for n in trainable if ".lora_" in n
    }
    assert adapted == {
        f"bert.encoder.layer.{i}.attention.{m}"
        for i in range(3)
        for m in ("self.query", "self.key", "self.value", "output.dense")
    }
    assert report.adapter_parameters > 0
    assert report.trainable_parameters < report.total_parameters / 4


def test_optimizer_groups_hold_trainable_parameters_only_with_their_rates():
    from domaintune.config import TrainingConfig

    training = TrainingConfig(
        learning_rate=1e-3,
        head_lr_multiplier=10,
        layerwise_lr_decay=0.5,
        weight_decay=0.1,
        strategy={"last_n_layers": 2},
    )
    model, _ = strategies.apply_strategy(_tiny("bert"), training.strategy, "text_classification")
    groups, rows = strategies.param_groups(model, training)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == (1e-2, 0.1)
    assert lr_of[id(named["classifier.bias"])] == (1e-2, 0.0)
    assert lr_of[id(named["bert.encoder.layer.2.attention.self.query.weight"])] == (1e-3, 0.1)
    assert lr_of[id(named["bert.encoder.layer.1.attention.self.query.weight"])] == (5e-4, 0.1)
    assert lr_of[id(named["bert.encoder.layer.1.output.LayerNorm.weight"])] == (5e-4, 0.0)
    assert sum(r["parameters"] for r in rows) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_drop_top_layers_and_a_custom_head_survive_save_and_load(tmp_path, tiny_model):
    task = get_task_type("text_classification")
    model = task.load_model(str(tiny_model), LABELS, 7)
    notes = strategies.prepare_structure(
        model,
        _strategy({"kind": "full", "drop_top_layers": 1, "head": {"hidden_sizes": [16]}}),
        str(tiny_model),
    )
    assert len(notes) == 2 and model.config.num_hidden_layers == 1
    model.save_pretrained(tmp_path / "m")
    again = task.load_model(str(tmp_path / "m"), LABELS, 0)
    assert len(again.bert.encoder.layer) == 1
    assert isinstance(again.classifier, torch.nn.Sequential)
    batch = {"input_ids": torch.tensor([[2, 10, 11, 12, 3]])}
    model.eval()
    again.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, again(**batch).logits, atol=1e-6)


def test_preflight_names_what_cannot_apply(tiny_model, other_tokenizer_model, tiny_causal_model):
    from domaintune.config import TrainingConfig

    def check(path, task="text_classification", **training):
        strategies.preflight(TrainingConfig(**training), str(path), task)

    with pytest.raises(ConfigError, match="last_n_layers: 5 is more than the model's 2"):
        check(tiny_model, strategy={"last_n_layers": 5})
    with pytest.raises(ConfigError, match="drop_top_layers: 2 would leave no blocks"):
        check(tiny_model, strategy={"kind": "full", "drop_top_layers": 2})
    with pytest.raises(ConfigError, match="'c_attn' matches no linear layer.*query"):
        check(tiny_model, strategy={"lora": {"target_modules": ["c_attn"]}})
    with pytest.raises(ConfigError, match="training.dropout.hidden: model type 'llama'"):
        check(tiny_causal_model, "causal_lm", dropout={"hidden": 0.2})
    with pytest.raises(ConfigError, match="vocabularies differ"):
        check(
            tiny_model,
            strategy={"kind": "full", "init_embeddings_from": str(other_tokenizer_model)},
        )
    out = strategies.preflight(
        TrainingConfig(dropout={"hidden": 0.2, "attention": 0.3, "classifier": 0.4}),
        str(tiny_model),
        "text_classification",
    )
    assert out["config_overrides"] == {
        "hidden_dropout_prob": 0.2,
        "attention_probs_dropout_prob": 0.3,
        "classifier_dropout": 0.4,
    }
    model = get_task_type("text_classification").load_model(
        str(tiny_model), LABELS, 0, **out["config_overrides"]
    )
    assert model.dropout.p == 0.4  # before the classifier
    assert model.bert.embeddings.dropout.p == 0.2
    assert model.config.attention_probs_dropout_prob == 0.3


# ------------------------------------------------------------------ real training runs


def _base_state(cfg, labels) -> dict[str, torch.Tensor]:
    task = get_task_type(cfg.task.type)
    model = task.load_model(cfg.model.name_or_path, labels, cfg.training.seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _saved_state(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in Path(model_dir).glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def _changed(before, after) -> set[str]:
    assert set(after) <= set(before), set(after) - set(before)
    return {k for k, v in after.items() if not torch.equal(v.float(), before[k].float())}


def _train(make_config, tmp_path, rows, strategy, zero, **sections):
    src = write_csv(tmp_path / "d.csv", rows(12))
    training = {
        "strategy": strategy,
        "max_steps": 4,
        "epochs": 1,
        "learning_rate": 1e-2,
        # ZeRO runs on two gloo ranks (one rank has nothing to partition and trains without
        # the engine); the global batch stays 8 either way
        "cpu_processes": 2 if zero else 1,
        "batch_size": 4 if zero else 8,
        "global_batch_size": 8,
        "deepspeed": {"zero_stage": zero},
        **sections.pop("training", {}),
    }
    cfg = make_config(src, training=training, **sections)
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    return cfg, splits, finetune(cfg, splits, store)


STRATEGY_CASES = {
    "full": ("full", r".*"),
    "head_only": ("head_only", r"^(classifier|bert\.pooler)\."),
    "last_n_layers": (
        {"last_n_layers": 1},
        r"^(classifier|bert\.pooler|bert\.encoder\.layer\.1)\.",
    ),
    "components": (
        {"components": ["attention", "head"]},
        r"^(classifier\.|bert\.pooler\.)|\.attention\.(self\.|output\.dense)",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
@pytest.mark.parametrize("case", list(STRATEGY_CASES))
def test_exactly_the_intended_parameters_change(tmp_path, make_config, rows, case, zero):
    strategy, expected = STRATEGY_CASES[case]
    cfg, splits, model = _train(make_config, tmp_path, rows, strategy, zero)
    before, after = _base_state(cfg, splits.labels), _saved_state(model.model_dir)
    assert set(after) == set(before)
    intended = {k for k in before if re.search(expected, k)}
    assert _changed(before, after) == intended
    summary = json.loads((Path(model.model_dir) / "training_summary.json").read_text())
    trainable = sum(before[k].numel() for k in intended)
    assert model.trainable_parameters == trainable == summary["optimizer_parameters"]
    assert model.strategy.kind == _strategy(strategy).kind
    # Adam state exists for the trainable parameters only (ZeRO may pad its flat buffer)
    state = summary["optimizer_state_elements"]
    assert trainable <= state <= trainable + 64, (state, trainable)
    assert model.peak_rss_mb and model.peak_rss_mb > 0


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_lora_changes_only_the_head_and_its_merged_export_matches_the_adapter_model(
    tmp_path, make_config, rows, zero
):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merge = zero == 2  # one run of each export form
    lora = {"lora": {"r": 4, "alpha": 8, "merge_on_export": merge}}
    cfg, splits, model = _train(make_config, tmp_path, rows, lora, zero)
    before, merged = _base_state(cfg, splits.labels), _saved_state(model.model_dir)
    changed = _changed(before, merged)
    # the merged attention weights moved by B @ A; the head trained; nothing else moved
    attention = {
        k for k in before
        if re.search(r"\.attention\.(self\.(query|key|value)|output\.dense)\.weight$", k)
    }  # fmt: skip
    assert changed == attention | {k for k in before if k.startswith("classifier.")}
    adapter = Path(model.model_dir) / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    # the merged export loads in plain transformers and gives the adapter model's outputs
    plain = AutoModelForSequenceClassification.from_pretrained(model.model_dir).eval()
    base = get_task_type(cfg.task.type).load_model(
        cfg.model.name_or_path, splits.labels, cfg.training.seed
    )
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(model.model_dir)
    batch = tok(
        ["Record profit and strong growth.", "Weak outlook, shares drop."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        a, b = plain(**batch).logits, with_adapter(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert model.strategy.adapter_parameters > 0
    # the registered model: merged weights, or the adapter alone when merge_on_export is off
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    reg = register(cfg, raw, splits, model, evaluate(cfg, splits, model, store), store)
    exported = Path(reg.model_dir)
    assert (exported / "model.safetensors").is_file() == merge
    assert (exported / "adapter_model.safetensors").is_file() != merge
    if not merge:
        assert json.loads((exported / "base_model.json").read_text())["name"]
        again = PeftModel.from_pretrained(
            get_task_type(cfg.task.type).load_model(
                cfg.model.name_or_path, splits.labels, cfg.training.seed
            ),
            str(exported),
        ).eval()
        with torch.no_grad():
            assert torch.allclose(again(**batch).logits, b, atol=1e-6)


@pytest.mark.slow
def test_partial_freezing_under_zero3_saves_full_weights_that_load_in_transformers(
    tmp_path, make_config, rows, tiny_causal_model
):
    from transformers import AutoModelForCausalLM

    docs = [{"text": f"{r['text']} The {r['label']} note ends here."} for r in rows(12)]
    src = write_jsonl(tmp_path / "corpus.jsonl", docs)
    cfg = make_config(
        src,
        task={"type": "causal_lm", "labels": None},
        model={"name_or_path": str(tiny_causal_model)},
        training={
            "strategy": {"last_n_layers": 1},
            "max_length": 32,
            "max_steps": 4,
            "learning_rate": 1e-2,
            "batch_size": 2,
            "cpu_processes": 2,
            "deepspeed": {"zero_stage": 3},
        },
    )
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    model = finetune(cfg, splits, store)
    assert model.launch.zero_engine and model.launch.world_size == 2
    before, after = _base_state(cfg, splits.labels), _saved_state(model.model_dir)
    assert set(after) == set(before), "ZeRO-3 gathered every tensor, frozen ones included"
    assert all(after[k].shape == before[k].shape for k in before)
    # tiny Llama unties its LM head: the top block, the final norm and the head train
    intended = {k for k in before if re.match(r"(model\.layers\.1\.|model\.norm\.|lm_head\.)", k)}
    assert _changed(before, after) == intended
    loaded = AutoModelForCausalLM.from_pretrained(model.model_dir)
    assert sum(p.numel() for p in loaded.parameters()) == model.total_parameters


@pytest.mark.slow
def test_early_stopping_counter_survives_a_resume(tmp_path, make_config, rows):
    """A checkpoint taken after one evaluation without improvement resumes with counter 1."""
    from domaintune.tasks import finetune as finetune_stage

    src = write_csv(tmp_path / "d.csv", rows(12))
    cfg = make_config(
        src,
        training={
            "learning_rate": 1e-12,  # nothing improves: the counter rises every evaluation
            "epochs": 1,
            "max_steps": 8,
            "batch_size": 8,
            "checkpoint_every_steps": 1,
            "early_stopping_patience": 3,
        },
    )
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    key, _, _ = finetune_stage.plan(cfg, splits)
    ckpts = store.scratch_dir("finetune", key) / "checkpoints"
    # first attempt: stopped by the crash after step 2 (counter 1 after the 2nd evaluation)
    import os

    os.environ["DOMAINTUNE_FAULT_EXIT_AFTER_STEP"] = "2"
    try:
        with pytest.raises(Exception, match="training exited with code"):
            finetune(cfg, splits, store)
    finally:
        del os.environ["DOMAINTUNE_FAULT_EXIT_AFTER_STEP"]
    state = json.loads((ckpts / "checkpoint-2" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]
    assert saved["early_stopping_patience_counter"] == 1
    model = finetune(cfg, splits, store)
    summary = json.loads((Path(model.model_dir) / "training_summary.json").read_text())
    assert summary["start_step"] == 2
    assert summary["early_stopping_counter_at_start"] == 1
    # patience 3: evaluations 3 and 4 bring it to 3 -> stops at step 4, not step 5
    assert model.global_step == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "limits, final_step",
    [
        ({"max_steps": 3}, 3),  # the step limit, mid-epoch
        ({"max_steps": 20, "early_stopping_patience": 1, "learning_rate": 1e-12}, 2),
    ],
    ids=["max_steps", "early_stopped"],
)
def test_a_resume_from_the_checkpoint_where_training_ended_trains_no_more(
    tmp_path, make_config, rows, limits, final_step
):
    """Killed after the last checkpoint (while saving the model): the retry finishes from it
    without another optimizer step (transformers runs one before it checks its limits)."""
    import os

    from domaintune.tasks import finetune as finetune_stage

    src = write_csv(tmp_path / "d.csv", rows(12))
    cfg = make_config(
        src, training={"epochs": 1, "batch_size": 4, "checkpoint_every_steps": 1, **limits}
    )
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    key, _, _ = finetune_stage.plan(cfg, splits)
    os.environ["DOMAINTUNE_FAULT_EXIT_AFTER_STEP"] = str(final_step)
    try:
        with pytest.raises(Exception, match="training exited with code"):
            finetune(cfg, splits, store)
    finally:
        del os.environ["DOMAINTUNE_FAULT_EXIT_AFTER_STEP"]
    ckpts = store.scratch_dir("finetune", key) / "checkpoints"
    assert max(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*")) == final_step
    model = finetune(cfg, splits, store)
    summary = json.loads((Path(model.model_dir) / "training_summary.json").read_text())
    assert summary["start_step"] == final_step
    assert model.global_step == final_step, "no step beyond where training had ended"


@pytest.mark.slow
def test_lora_under_zero3_on_token_classification(tmp_path, make_config):
    from tests.conftest import make_ner_sentences

    src = write_jsonl(tmp_path / "ner.jsonl", make_ner_sentences(40))
    cfg = make_config(
        src,
        task={"type": "token_classification", "labels": ["PER", "ORG", "LOC"]},
        training={
            "strategy": {"lora": {"r": 4, "target_modules": ["attention", "feed_forward"]}},
            "max_steps": 3,
            "learning_rate": 1e-2,
            "batch_size": 4,
            "cpu_processes": 2,
            "deepspeed": {"zero_stage": 3},
        },
    )
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    model = finetune(cfg, splits, store)
    before, after = _base_state(cfg, splits.labels), _saved_state(model.model_dir)
    adapted = {
        k for k in before
        if re.search(r"\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)\.weight$", k)
    }  # fmt: skip
    assert _changed(before, after) == adapted | {"classifier.weight", "classifier.bias"}
    report = evaluate(cfg, splits, model, store)
    assert "entity_f1" in report.finetuned


@pytest.mark.slow
def test_smaller_model_custom_head_and_borrowed_frozen_embeddings(
    tmp_path, make_config, rows, tiny_model
):
    from transformers import AutoConfig, AutoTokenizer, BertModel

    donor = tmp_path / "donor"  # same tokenizer, other weights
    torch.manual_seed(1)
    BertModel(AutoConfig.from_pretrained(tiny_model)).save_pretrained(donor)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(donor)
    strategy = {
        "kind": "full",
        "drop_top_layers": 1,
        "head": {"hidden_sizes": [16], "dropout": 0.0},
        "init_embeddings_from": str(donor),
        "freeze_embeddings": True,
    }
    cfg, splits, model = _train(make_config, tmp_path, rows, strategy, 2)
    after = _saved_state(model.model_dir)
    donor_state = _saved_state(str(donor))
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(after[key], donor_state["embeddings.word_embeddings.weight"])
    assert not any(k.startswith("bert.encoder.layer.1.") for k in after), "top block dropped"
    assert {"classifier.0.weight", "classifier.3.weight"} <= set(after)
    assert model.strategy.num_layers == 1
    report = evaluate(cfg, splits, model, Store(cfg.store.root))
    assert 0 <= report.finetuned["accuracy"] <= 1
    # the base model is scored exactly as training started from it: the worker's model
    # (one block, the custom head, the donor's embeddings) gives the same predictions
    import numpy as np
    import pandas as pd

    from domaintune.chaining import resolve_config_model
    from domaintune.loading import autocast_for
    from domaintune.training.launch import inference_precision
    from domaintune.training.spec import WorkerSpec
    from domaintune.training.worker import prepare_model

    precision = inference_precision(cfg.training)[0]
    spec = WorkerSpec(
        task=cfg.task,
        training=cfg.training,
        labels=splits.labels,
        model_path=resolve_config_model(cfg).path,
        precision=precision,
    )
    start = prepare_model(spec).eval()
    with torch.no_grad(), autocast_for(start, precision):
        _, expected = get_task_type(cfg.task.type).score_split(
            start,
            AutoTokenizer.from_pretrained(tiny_model),
            splits.splits["test"].path,
            splits.labels,
            cfg.evaluation.batch_size,
        )
    (scored,) = (Path(cfg.store.root) / "evaluate_base").glob("*/predictions.parquet")
    base = pd.read_parquet(scored)
    assert base["predicted"].tolist() == expected["predicted"].tolist()
    assert np.allclose(base["confidence"], expected["confidence"], atol=2e-3)
