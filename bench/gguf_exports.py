"""GGUF exports of the real SmolLM2-135M-Instruct (the default generative model), checked the
way the export stage checks them: f32, f16 and q8_0 through llama.cpp's converter from PyPI,
read back by transformers' GGUF reader, against the model on real chat prompts.

    .venv/bin/python bench/gguf_exports.py [--types f32 f16 q8_0] [--max-new-tokens 24]

Prints per type: file size, export seconds, parity seconds, the largest next-token logit
difference (and the largest logit), next-token agreement, identical greedy answers and
identical token ids. (The tests check the same on a tiny model with SmolLM2's tokenizer:
tests/test_llm_export.py; f16 and q8_0 on the real model are here.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Summarise: Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in 2007.",
    "Write a one-line headline for: shares of the bank fell 5% after the results.",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from domaintune.exporting import machine_line
    from domaintune.llm_export import gguf_export, gguf_parity, merged_export
    from domaintune.models import resolve_pretrained

    print(f"machine: {machine_line()}; {time.strftime('%Y-%m-%d %H:%M')}")
    source = Path(resolve_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct").path)
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged"
        info = merged_export(source, merged)
        print(f"merged copy: {info['bytes'] / 1e6:.1f} MB, {info['dtype']}")
        print(f"{'type':6s} {'MB':>7s} {'export s':>8s} {'parity s':>8s} {'max dlogit':>10s} "
              f"{'next tok':>8s} {'greedy':>7s} {'ids':>4s}")  # fmt: skip
        for outtype in args.types:
            t0 = time.time()
            path = gguf_export(merged, Path(tmp) / "gguf", outtype=outtype)
            t1 = time.time()
            r = gguf_parity(merged, path, PROMPTS, max_new_tokens=args.max_new_tokens)
            t2 = time.time()
            print(f"{outtype:6s} {path.stat().st_size / 1e6:>7.1f} {t1 - t0:>8.1f} {t2 - t1:>8.1f} "
                  f"{r['max_abs_logit_diff']:>10.3g} {r['next_token_agreement']:>8.0%} "
                  f"{r['greedy_identical']:>7.0%} "
                  f"{'same' if r['tokenizer_identical'] else 'DIFF':>4s}")  # fmt: skip
            path.unlink()


if __name__ == "__main__":
    main()
