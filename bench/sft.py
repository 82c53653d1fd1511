"""LLM supervised fine-tuning throughput: domaintune's finetune stage against what a user would
write instead, on the same examples, model, method and hyperparameters, in one run.

  (a) domaintune  the finetune stage as the flow runs it: DeepSpeed launcher, padding-free
                  batches (examples end to end, positions per example, attention per example),
                  the output layer on answer positions only, bf16 autocast where the CPU has
                  bf16 (fp32 attention kernel), TCMalloc
  (b) trl         a plain TRL ``SFTTrainer`` script with its defaults (bf16, gradient
                  checkpointing, padded batches, completion-only loss), given prompt /
                  completion conversations
  (c) trainer     a plain transformers ``Trainer`` script: the chat template, prompt labels
                  -100, ``DataCollatorForSeq2Seq`` padding, fp32 (TrainingArguments' default)

Every system trains one epoch over domaintune's training split in the same order (the
Trainer's seeded random sampler), logs its loss every ``--log-every`` steps and runs one
validation pass at the end. Each runs in its own process. Full fine-tuning and LoRA (r 16,
alpha 32, dropout 0.05, on attention and MLP) each. It prints, per method, tokens/s (the
split's real tokens / the time of ``trainer.train()``), the training wall time, the ratios
a/b and a/c (goal on CPU: a/b >= 1.5) and the loss curves side by side.

    python bench/sft.py                       # support answers (examples/support_answers_bitext)
    python bench/sft.py --data headlines      # BBC business headlines (short answers)
    python bench/sft.py --examples 128 --methods lora --systems domaintune,trl

TRL is not a dependency of domaintune: ``pip install -c constraints.txt trl==1.16.0``.
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
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DATA = {
    "support": {
        "data": {
            "source": str(
                ROOT
                / "examples/support_answers_bitext/Bitext_Sample_Customer_Support_Training_Dataset.csv.gz"
            ),
            "instruction_column": "instruction",
            "output_column": "response",
        },
        "max_length": 384,
    },
    "headlines": {
        "data": {"source": str(ROOT / "examples/headlines_bbc_business/headlines.jsonl")},
        "max_length": 256,
    },
}


# ------------------------------------------------------------------------ baselines


def _records(path: str) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in Path(path).read_text().splitlines()]


def _arguments(job: dict[str, Any], cls: Any, **extra: Any) -> Any:
    """The hyperparameters every system shares (``cls``: TrainingArguments or SFTConfig)."""
    return cls(
        output_dir=job["output_dir"],
        num_train_epochs=1,
        per_device_train_batch_size=job["batch_size"],
        per_device_eval_batch_size=job["batch_size"],
        learning_rate=job["learning_rate"],
        warmup_steps=job["warmup_ratio"],
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=job["seed"],
        data_seed=job["seed"],
        logging_steps=job["log_every"],
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        **extra,
    )


def _lora(job: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA_MODULES,
        task_type="CAUSAL_LM",
    )


def run_trl(job: dict[str, Any]) -> Any:
    """A plain TRL script: prompt / completion conversations, SFTConfig's defaults."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    def rows(path: str) -> Dataset:
        return Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in _records(path)])

    args = _arguments(job, SFTConfig, max_length=job["max_length"])
    return SFTTrainer(
        model=job["model"],
        args=args,
        train_dataset=rows(job["train"]),
        eval_dataset=rows(job["validation"]),
        peft_config=_lora(job) if job["method"] == "lora" else None,
    )


def run_trainer(job: dict[str, Any]) -> Any:
    """A plain Trainer script: chat template, prompt labels -100, padded batches, fp32."""
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(job["model"])

    def encode(messages: list[dict]) -> dict:
        prompt = tok.apply_chat_template(
            messages[:-1], add_generation_prompt=True, return_dict=False
        )
        full = tok.apply_chat_template(messages, return_dict=False)[: job["max_length"]]
        labels = [-100] * min(len(prompt), len(full)) + full[len(prompt) :]
        return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}

    def rows(path: str) -> Dataset:
        return Dataset.from_list([encode(m) for m in _records(path)])

    model = AutoModelForCausalLM.from_pretrained(job["model"])
    if job["method"] == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, _lora(job))
    return Trainer(
        model=model,
        args=_arguments(job, TrainingArguments),
        train_dataset=rows(job["train"]),
        eval_dataset=rows(job["validation"]),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
    )


BASELINES = {"trl": run_trl, "trainer": run_trainer}


def baseline_main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    trainer = BASELINES[job["system"]](job)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    args = trainer.args
    Path(result_path).write_text(
        json.dumps(
            {
                "train_seconds": seconds,
                "precision": "bf16" if args.bf16 else "fp32",
                "gradient_checkpointing": bool(args.gradient_checkpointing),
                "losses": [
                    (e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e
                ],
            }
        )
    )


def _baseline(job: dict[str, Any], work: Path) -> dict[str, Any]:
    name = f"{job['system']}-{job['method']}"
    job_path, out = work / f"job-{name}.json", work / f"result-{name}.json"
    job_path.write_text(json.dumps({**job, "output_dir": str(work / name)}))
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--baseline", str(job_path), "--result", str(out)],
        check=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------ domaintune


def domaintune_config(args: argparse.Namespace, method: str, work: Path) -> Any:
    from domaintune.config import RetrainConfig

    data = DATA[args.data]
    strategy = {"lora": {**LORA, "target_modules": ["attention", "feed_forward"]}}
    return RetrainConfig.model_validate(
        {
            "name": f"bench-sft-{args.data}",
            "task": {"type": "instruction_tuning"},
            "data": data["data"],
            "model": {"name_or_path": SMOLLM2},
            "training": {
                "epochs": 1,
                "batch_size": args.batch_size,
                "eval_batch_size": args.batch_size,
                "learning_rate": args.learning_rate[method],
                "warmup_ratio": 0.1,
                "weight_decay": 0.0,
                "max_length": data["max_length"],
                "early_stopping_patience": None,
                "logging_steps": args.log_every,
                **({"strategy": strategy} if method == "lora" else {}),
            },
            "evaluation": {"test_size": 0.05, "val_size": args.val_share},
            "store": {"root": str(work / "store")},
        }
    )


def run_domaintune(cfg: Any, examples: int, work: Path) -> tuple[dict[str, Any], Any, int]:
    """(result, splits, train tokens): the finetune stage on ``examples`` training rows."""
    import pandas as pd

    from domaintune.storage.store import Store
    from domaintune.tasks.finetune import finetune
    from domaintune.tasks.ingest import ingest
    from domaintune.tasks.preprocess import preprocess
    from domaintune.tasks.validate import validate

    store = Store(cfg.store.root)
    raw = ingest(cfg, store)
    validate(cfg, raw, store)
    splits = preprocess(cfg, raw, store)
    train_path = splits.splits["train"].path
    train = pd.read_parquet(train_path)
    if examples and examples < len(train):  # the first rows of the split (seeded order)
        train = train.head(examples)
        train.to_parquet(train_path, index=False)  # a bench-only store: cut in place
    tokens = int(train["length"].sum())
    t0 = time.perf_counter()
    artifact = finetune(cfg, splits, store)
    wall = time.perf_counter() - t0
    summary = json.loads((Path(artifact.model_dir) / "training_summary.json").read_text())
    return (
        {
            "train_seconds": summary["train_seconds"],
            "wall_seconds": wall,
            "precision": summary["precision"],
            "gradient_checkpointing": summary["gradient_checkpointing"],
            "losses": [(e["step"], e["loss"]) for e in summary["log_history"] if "loss" in e],
            "trainable_parameters": summary["trainable_parameters"],
        },
        splits,
        tokens,
    )


def export_split(splits: Any, name: str, out: Path, rows: int | None = None) -> str:
    """A split's conversations, in its order, for the baselines."""
    import pandas as pd

    table = pd.read_parquet(splits.splits[name].path, columns=["messages"])
    if rows:
        table = table.head(rows)
    out.write_text(
        "".join(json.dumps({"messages": json.loads(m)}) + "\n" for m in table["messages"])
    )
    return str(out)


# ------------------------------------------------------------------------ report


def cpu_line() -> str:
    from domaintune.training.launch import cpu_bf16_features

    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    bf16 = cpu_bf16_features()
    return f"{os.cpu_count()} x {model}, bf16: {', '.join(bf16) if bf16 else 'none (AVX2 only)'}"


def report(method: str, results: dict[str, dict], tokens: int, examples: int) -> None:
    print(f"\n== {method}: {examples} examples, {tokens:,} tokens, one epoch")
    print(
        f"{'':11s} {'precision':>9s} {'ckpt':>5s} {'tokens/s':>9s} {'train s':>8s} {'wall s':>8s}"
    )
    for name, r in results.items():
        r["tokens_per_second"] = tokens / r["train_seconds"]
        print(
            f"{name:11s} {r['precision']:>9s} {'yes' if r['gradient_checkpointing'] else 'no':>5s} "
            f"{r['tokens_per_second']:9.1f} {r['train_seconds']:8.1f} {r['wall_seconds']:8.1f}"
        )
    ours = results.get("domaintune")
    for name, r in results.items():
        if ours is not None and name != "domaintune":
            ratio = ours["tokens_per_second"] / r["tokens_per_second"]
            goal = (
                " (goal >= 1.5x: " + ("met)" if ratio >= 1.5 else "NOT met)")
                if name == "trl"
                else ""
            )
            print(f"domaintune / {name}: {ratio:.2f}x tokens/s{goal}")
    steps = sorted({s for r in results.values() for s, _ in r["losses"]})
    print("loss by step: " + "  ".join(f"{n}" for n in results))
    for step in steps:
        row = [dict(r["losses"]).get(step) for r in results.values()]
        print(
            f"  step {step:4d}: " + "  ".join("   -  " if v is None else f"{v:6.3f}" for v in row)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=sorted(DATA), default="support")
    parser.add_argument("--examples", type=int, default=192, help="training examples (0: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--val-share", type=float, default=0.02)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--systems", default="domaintune,trl,trainer")
    parser.add_argument("--work", default=None, help="keep the stores here (default: temporary)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--baseline", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        return baseline_main(args.baseline, args.result)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    args.learning_rate = {"full": 1e-4, "lora": 2e-4}
    systems = args.systems.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-sft-"))
    print(f"{time.strftime('%Y-%m-%d')} {cpu_line()}; data {args.data}; work {work}")
    everything = {}
    for method in args.methods.split(","):
        mwork = work / method
        mwork.mkdir(parents=True, exist_ok=True)
        cfg = domaintune_config(args, method, mwork)
        results: dict[str, dict] = {}
        ours, splits, tokens = run_domaintune(cfg, args.examples, mwork)
        if "domaintune" in systems:
            results["domaintune"] = ours
        from domaintune.chaining import resolve_config_model

        job = {
            "method": method,
            "model": resolve_config_model(cfg).path,
            "train": export_split(splits, "train", mwork / "train.jsonl", args.examples),
            "validation": export_split(splits, "validation", mwork / "validation.jsonl"),
            "max_length": cfg.training.max_length,
            "batch_size": args.batch_size,
            "learning_rate": cfg.training.learning_rate,
            "warmup_ratio": cfg.training.warmup_ratio,
            "seed": cfg.training.seed,
            "log_every": args.log_every,
        }
        for name in [s for s in systems if s in BASELINES]:
            results[name] = _baseline({**job, "system": name}, mwork)
        report(method, results, tokens, min(args.examples or 10**9, splits.splits["train"].rows))
        everything[method] = results
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()
