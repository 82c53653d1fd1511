"""The DeepSpeed config handed to the HF Trainer ("auto" values are filled in by it)."""

from __future__ import annotations

from typing import Any

from domaintune.config import DeepSpeedConfig


def build_deepspeed_config(
    ds: DeepSpeedConfig, *, bf16: bool, fp16: bool, autocast: bool = False
) -> dict[str, Any]:
    """``autocast``: bf16 as torch autocast around fp32 weights (DeepSpeed's
    ``torch_autocast``) instead of DeepSpeed's bf16 mode, which casts the whole model to
    bf16: frozen weights would come back rounded, and on a CPU the bf16 matmuls are what
    is faster, not bf16 storage. Gradients are reduced in fp32 (no lower-precision modules)."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if ds.offload_optimizer and ds.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_parameters and ds.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.zero_stage == 3:
        # gather the full 16-bit weights on save, so the saved model loads in plain transformers
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": bf16 and not autocast},
        "fp16": {"enabled": fp16},
        # the Trainer's torch AdamW: DeepSpeed's fused/CPU Adam would need a long JIT build
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16 and autocast:
        out["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        }
    return out
