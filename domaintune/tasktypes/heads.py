"""A custom classification head (``training.strategy.head``): built before training, saved
in the model's ``config.json`` (``domaintune_head``) and rebuilt when the model is loaded.

Depends on nothing of domaintune but the config, so that task types can restore a head
without importing the training strategies (which import the task types).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from domaintune.config import HeadConfig
from domaintune.errors import ConfigError


def _head_module(model: Any) -> tuple[str, Any]:
    import torch.nn as nn

    num_labels = model.config.num_labels
    for name in ("classifier", "score"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Linear) and mod.out_features == num_labels:
            return name, mod
    raise ConfigError(
        f"training.strategy.head: cannot find the linear classification head of "
        f"{type(model).__name__}"
    )


def _mlp(in_features: int, out_features: int, spec: dict[str, Any]) -> Any:
    import torch.nn as nn

    act = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}[spec["activation"]]
    layers: list[nn.Module] = []
    width = in_features
    for h in spec["hidden_sizes"]:
        layers += [nn.Linear(width, h), act(), nn.Dropout(spec["dropout"])]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def build_head(model: Any, head: HeadConfig) -> str:
    name, linear = _head_module(model)
    cfg = model.config
    dropout = head.dropout
    if dropout is None:
        dropout = getattr(cfg, "classifier_dropout", None) or getattr(
            cfg, "hidden_dropout_prob", 0.1
        )
    spec = {
        "module": name,
        "hidden_sizes": list(head.hidden_sizes),
        "dropout": float(dropout),
        "activation": head.activation,
    }
    setattr(model, name, _mlp(linear.in_features, linear.out_features, spec))
    cfg.domaintune_head = spec  # saved in config.json; restore_head rebuilds it on load
    return f"head {name}: {linear.in_features} -> {spec['hidden_sizes']} -> {linear.out_features}"


def restore_head(model: Any, path: str) -> Any:
    """Give a model loaded by transformers the custom head it was saved with."""
    import torch
    from safetensors.torch import load_file

    spec = getattr(model.config, "domaintune_head", None)
    if not spec:
        return model
    linear = getattr(model, spec["module"])
    mlp = _mlp(linear.in_features, linear.out_features, spec)
    state: dict[str, torch.Tensor] = {}
    head_prefix = spec["module"] + "."
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(
            {
                k[len(head_prefix) :]: v
                for k, v in load_file(str(f)).items()
                if k.startswith(head_prefix)
            }
        )
    mlp.load_state_dict(state)
    setattr(model, spec["module"], mlp.to(linear.weight.device))
    return model
