"""Which attention kernel a model trains and scores with.

On a GPU in bf16/fp16: FlashAttention-2 where installed, else PyTorch SDPA. On a CPU under bf16
autocast, PyTorch's fused SDPA kernel is many times slower in bf16 than in fp32 (measured with
torch 2.13 on AVX512-BF16/AMX: 32 x 12 heads x 48 tokens, forward + backward, 29 ms in bf16 vs
3.8 ms in fp32, and 30 vs 7.9 ms at 16 x 128 tokens), while the matrix products around it are
the ones bf16 speeds up. So there attention runs in fp32 through the fused kernel
(``CPU_BF16_ATTENTION``), and everything else in bf16. With attention dropout in training the
fused kernel cannot run at all (the math path does, at the same speed in bf16 and fp32), and
this changes nothing.
"""

from __future__ import annotations

from typing import Any

#: The registered name of SDPA computed in fp32 on CPU (see the module's docstring).
CPU_BF16_ATTENTION = "sdpa_fp32_on_cpu"


def _sdpa_fp32_on_cpu(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, Any]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or dropout > 0 or query.dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, **kwargs)
    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, dropout, **kwargs
        )
    return out.to(dtype), weights


def register() -> None:
    """Make ``CPU_BF16_ATTENTION`` known to transformers (in this process)."""
    from transformers import AttentionInterface

    AttentionInterface.register(CPU_BF16_ATTENTION, _sdpa_fp32_on_cpu)


def attention_implementation(choice: str, precision: str, model_path: str) -> str | None:
    """The attention kernel to load the model with (None: transformers' default, SDPA
    where the model supports it)."""
    if choice != "auto":
        return choice
    import importlib.util

    import torch

    if torch.cuda.is_available():
        if precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn"):
            return "flash_attention_2"
        return None
    if precision == "bf16" and _supports_attention_interface(model_path):
        register()
        return CPU_BF16_ATTENTION
    return None


def _supports_attention_interface(model_path: str) -> bool:
    """Whether the model's class dispatches attention through transformers' attention
    interface (and can therefore use a registered kernel)."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        cfg = AutoConfig.from_pretrained(model_path)
        cls = MODEL_MAPPING[type(cfg)]
    except Exception:  # remote code, unknown architectures: keep transformers' default
        return False
    return bool(getattr(cls, "_supports_attention_backend", False)) and bool(
        getattr(cls, "_supports_sdpa", False)
    )
