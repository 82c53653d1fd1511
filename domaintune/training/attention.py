"""Which attention kernel a model trains and scores with.

On a GPU in bf16/fp16: FlashAttention-2 where installed, else PyTorch SDPA. On a CPU, models
that dispatch attention through transformers' attention interface load with ``CPU_ATTENTION``,
a registered function that picks the fastest correct path per call:

- under bf16 autocast without dropout: PyTorch's fused SDPA kernel in fp32. That kernel is
  many times slower in bf16 than in fp32 (torch 2.13 on AVX512-BF16/AMX: 32 x 12 heads x 48
  tokens, forward + backward, 29 ms in bf16 vs 3.8 ms in fp32, and 30 vs 7.9 ms at 16 x 128
  tokens), while the matrix products around it are the ones bf16 speeds up;
- with attention dropout in training (the fused kernel has none; PyTorch's math path draws
  its mask with slow ``bernoulli_``): the same math in fp32 with the cheaper CPU dropout
  masks of ``domaintune.training.dropout``;
- otherwise (fp32 without dropout, position biases, caches): transformers' SDPA as is.
Saved model configs do not name the kernel: they load anywhere.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from domaintune.config import Precision

#: The registered name of the CPU attention function (see the module's docstring).
CPU_ATTENTION = "domaintune_cpu"


def _cpu_attention(
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

    if kwargs.get("cu_seq_lens_q") is not None and query.device.type == "cpu":
        return _packed_attention(module, query, key, value, dropout, **kwargs), None
    if (
        query.shape[2] == 1
        and query.device.type == "cpu"
        and dropout == 0
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and (attention_mask is None or attention_mask.shape[1] == 1)
    ):  # one new token against a key/value cache: generation
        return _decode_attention(query, key, value, attention_mask, kwargs.get("scaling")), None
    plain = (
        query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or (query.dtype == torch.float32 and dropout == 0)
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, **kwargs)
    dtype = query.dtype
    if dropout > 0:
        out = _math_attention_with_cpu_dropout(module, query, key, value, attention_mask,
                                               dropout, **kwargs)  # fmt: skip
        return out.to(dtype), None
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, dropout, **kwargs
        )
    return out.to(dtype), weights


def _decode_attention(
    query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None
) -> Any:
    """Attention of one new token per row against a key/value cache, in fp32, with the query
    heads grouped by the key/value head they share (GQA), so the cache is never repeated per
    query head. PyTorch's fused CPU kernel takes 38 ms a layer for 64 rows x 9 heads over 300
    cached tokens (the cache repeated 3x and cast to fp32 first), this 1.3 ms, with the same
    result. Returns (batch, 1, heads, head_dim) as attention functions do."""
    import torch

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)
    with torch.autocast("cpu", enabled=False):
        q = query.float().reshape(batch, kv_heads, groups * q_len, dim)
        scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale
        if attention_mask is not None:
            mask = attention_mask[:, :, :, : key.shape[2]].repeat(1, 1, groups, 1)
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
            else:
                scores = scores + mask.float()
        out = torch.matmul(torch.softmax(scores, dim=-1), value.float())
    out = out.reshape(batch, heads, q_len, dim).transpose(1, 2)
    return out.to(query.dtype).contiguous()


def _packed_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: Any = None,
    cu_seq_lens_k: Any = None,
    **kwargs: Any,
) -> Any:
    """Causal attention within each example of a padding-free batch (one row, examples end to
    end, ``cu_seq_lens`` their boundaries): the fused SDPA kernel per example, in fp32, so no
    token attends across examples and no (tokens x tokens) mask is computed. Returns
    (batch, tokens, heads, head_dim) as attention functions do."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv

    dtype = query.dtype
    q_bounds = [int(b) for b in cu_seq_lens_q.tolist()]
    kv = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
    kv_bounds = [int(b) for b in kv.tolist()]
    groups = getattr(module, "num_key_value_groups", 1)
    window = kwargs.get("sliding_window")  # a local layer (Gemma 3: 512) sees that far back
    parts = []
    with torch.autocast("cpu", enabled=False):
        for (a, b), (c, d) in zip(
            itertools.pairwise(q_bounds), itertools.pairwise(kv_bounds), strict=True
        ):
            q, k, v = (x.float() for x in (query[:, :, a:b], key[:, :, c:d], value[:, :, c:d]))
            band = None
            if window and d - c > window:  # causal and within the window, as transformers masks
                pos_q = torch.arange(d - c - (b - a), d - c, device=q.device)[:, None]
                pos_k = torch.arange(d - c, device=q.device)[None, :]
                band = (pos_k <= pos_q) & (pos_k > pos_q - window)
            if dropout > 0:  # the math path, with the cheap CPU masks (it repeats k/v itself)
                parts.append(
                    _math_attention_with_cpu_dropout(
                        module, q, k, v, band, dropout, scaling, band is None
                    )
                )
                continue
            if groups > 1:
                k, v = repeat_kv(k, groups), repeat_kv(v, groups)
            if band is not None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scaling)
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
            parts.append(out.transpose(1, 2))
    return torch.cat(parts, dim=1).to(dtype).contiguous()


def _math_attention_with_cpu_dropout(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **_: Any,
) -> Any:
    """softmax(q k^T * scale + mask) with dropout, times v, in fp32; the mask conventions of
    transformers' SDPA path (boolean: True attends; float: added; none: causal if the module
    is). Returns (batch, tokens, heads, head_dim) as attention functions do."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from domaintune.training.dropout import dropout as cpu_dropout

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_len > 1 and attention_mask is None and causal
    lowest = torch.finfo(torch.float32).min
    with torch.autocast("cpu", enabled=False):
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, lowest)
            else:
                scores = scores + attention_mask.float()
        elif causal:
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
            scores = scores.masked_fill(~allowed, lowest)
        probs = cpu_dropout(torch.softmax(scores, dim=-1), dropout)
        out = torch.matmul(probs, value.float())
    return out.transpose(1, 2).contiguous()


def register() -> None:
    """Make ``CPU_ATTENTION`` known to transformers (in this process), with SDPA's masks:
    transformers builds no attention mask at all (padding included) for an attention
    function whose name its mask interface does not know."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_ATTENTION, _cpu_attention)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)


def attention_implementation(choice: str, precision: Precision, model_path: str) -> str | None:
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
    if _supports_attention_interface(model_path):
        register()
        return CPU_ATTENTION
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
