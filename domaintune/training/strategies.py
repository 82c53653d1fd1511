"""Strategies decide what trains. Applied to the model before DeepSpeed initialises.

Every parameter of a model is placed in one *component* (``embeddings``, ``attention``,
``feed_forward``, ``layer_norm``, ``head``) and at one *depth* (0: embeddings, 1..L: the
transformer blocks bottom to top, L+1: what sits above them: final norm, pooler, head). The
placement is resolved per architecture: the block list and the attention / feed-forward
children of a block come from a table (BERT-likes, DistilBERT, GPT-2, Llama-likes), norms and
embeddings are recognised by their module types, the head is whatever the task model adds on
top of its base model (plus a BERT pooler, which only feeds the head). Models not in the table
fall back to module types alone (``*Attention`` classes, the longest list of identical blocks).

A strategy then sets ``requires_grad`` from that map, and :func:`param_groups` builds the
optimizer's groups from trainable parameters only (so frozen ones never get optimizer state),
with the head learning rate, layer-wise learning-rate decay and weight decay that skips
biases and norm weights.

Weights tied between the input embeddings and the LM head (SmolLM2) are one parameter in both
components: it trains when either is selected, unless ``freeze_embeddings``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domaintune.config import DropoutConfig, StrategyConfig, TrainingConfig
from domaintune.errors import ConfigError
from domaintune.storage.manifests import StrategyReport
from domaintune.tasktypes import get_task_type, task_type_names
from domaintune.tasktypes.heads import build_head

log = logging.getLogger(__name__)

COMPONENTS = ("embeddings", "attention", "feed_forward", "layer_norm", "head")


def _new_head_tasks() -> list[str]:
    """Task types whose model adds a head of its own, created for the run (TaskType.new_head)."""
    return [n for n in task_type_names() if get_task_type(n).new_head]


@dataclass(frozen=True)
class Arch:
    blocks: str  # the ModuleList of transformer blocks, relative to the base model
    attention: tuple[str, ...]  # children of a block that are attention
    feed_forward: tuple[str, ...]  # children of a block that are the feed-forward network


_BERT = Arch("encoder.layer", ("attention",), ("intermediate", "output"))
_LLAMA = Arch("layers", ("self_attn",), ("mlp",))
ARCHITECTURES: dict[str, Arch] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "camembert": _BERT,
    "distilbert": Arch("transformer.layer", ("attention",), ("ffn",)),
    "gpt2": Arch("h", ("attn",), ("mlp",)),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "phi3": _LLAMA,
}
#: Config attributes a dropout override sets, by what it means (the first that exist).
DROPOUT_KEYS = {
    "hidden": ("hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"),
    "attention": ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout"),
    "classifier": ("classifier_dropout", "summary_first_dropout", "seq_classif_dropout"),
}
#: Config attributes holding the number of blocks.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass
class ParamInfo:
    names: list[str]
    components: set[str]
    depth: int
    numel: int
    no_decay: bool
    param: Any = field(repr=False)


@dataclass
class ParameterMap:
    params: list[ParamInfo]
    num_layers: int
    model_type: str
    resolved_by: str  # "table" or "module types"

    def select(self, wanted: set[str]) -> list[ParamInfo]:
        return [p for p in self.params if p.components & wanted]


# ------------------------------------------------------------------------------ mapping


def _is_norm(module: Any) -> bool:
    import torch.nn as nn

    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm", "Norm"))


def _base_prefix(model: Any) -> str:
    """Name of the base model inside a task model ('' when the model is its own base)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix) and getattr(model, prefix) is not model:
        return prefix
    return ""


def _find_blocks(base: Any, model_type: str) -> tuple[str, Any, Arch | None]:
    import torch.nn as nn

    arch = ARCHITECTURES.get(model_type)
    if arch is not None:
        try:
            return arch.blocks, base.get_submodule(arch.blocks), arch
        except AttributeError:
            pass
    best: tuple[str, Any] | None = None
    for name, mod in base.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ConfigError(
            f"strategy: cannot find the transformer blocks of model type {model_type!r}; "
            "use strategy full or lora with module names"
        )
    return best[0], best[1], None


def parameter_map(model: Any) -> ParameterMap:
    """Place every parameter of ``model`` in a component and at a depth (see module doc)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    model_type = getattr(getattr(inner, "config", None), "model_type", "") or ""
    prefix = _base_prefix(inner)
    base = getattr(inner, prefix) if prefix else inner
    blocks_path, blocks, arch = _find_blocks(base, model_type)
    n = len(blocks)
    base_dot = f"{prefix}." if prefix else ""
    block_dot = f"{base_dot}{blocks_path}."
    by_id: dict[int, ParamInfo] = {}
    order: list[ParamInfo] = []
    modules = dict(inner.named_modules())
    for mname, module in inner.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            comp, depth = _place(full, module, modules, base_dot, block_dot, arch, n, bool(prefix))
            info = by_id.get(id(p))
            if info is None:
                info = ParamInfo([full], {comp}, depth, p.numel(), False, p)
                info.no_decay = p.ndim < 2 or _is_norm(module)
                by_id[id(p)] = info
                order.append(info)
            else:  # tied weights: one parameter, several names
                info.names.append(full)
                info.components.add(comp)
                info.depth = min(info.depth, depth)
    return ParameterMap(order, n, model_type, "table" if arch else "module types")


def _place(
    full: str,
    module: Any,
    modules: dict[str, Any],
    base_dot: str,
    block_dot: str,
    arch: Arch | None,
    n: int,
    has_head: bool,
) -> tuple[str, int]:
    import torch.nn as nn

    if has_head and not full.startswith(base_dot):
        return "head", n + 1
    if full.startswith(block_dot):
        index, _, rest = full[len(block_dot) :].partition(".")
        depth = int(index) + 1
        if _is_norm(module):
            return "layer_norm", depth
        child = rest.split(".", 1)[0]
        if arch is not None:
            if child in arch.attention:
                return "attention", depth
            if child in arch.feed_forward:
                return "feed_forward", depth
        # module types: any enclosing *Attention module inside the block
        parts = full.split(".")[:-1]
        block_prefix = block_dot + index
        for i in range(len(parts), 0, -1):
            name = ".".join(parts[:i])
            if len(name) <= len(block_prefix):
                break
            if "Attention" in type(modules[name]).__name__:
                return "attention", depth
        return "feed_forward", depth
    rel = full[len(base_dot) :]
    if rel.startswith("embeddings.") or isinstance(module, nn.Embedding):
        return ("layer_norm" if _is_norm(module) else "embeddings"), 0
    if _is_norm(module):
        return "layer_norm", n + 1
    if rel.startswith("pooler."):
        return "head", n + 1  # the pooler only feeds the classification head
    return "other", n + 1


def component_counts(pmap: ParameterMap) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for info in pmap.params:
        for comp in sorted(info.components):
            row = out.setdefault(comp, {"trainable": 0, "total": 0})
            row["total"] += info.numel
            row["trainable"] += info.numel if info.param.requires_grad else 0
    return out


# ------------------------------------------------------------------------- pre-flight


def dropout_overrides(dropout: DropoutConfig, model_config: Any) -> dict[str, float]:
    """Config attributes to set when loading the model; an error for a dropout the
    architecture does not have."""
    out: dict[str, float] = {}
    for what, value in dropout.model_dump().items():
        if value is None:
            continue
        keys = [k for k in DROPOUT_KEYS[what] if hasattr(model_config, k)]
        if not keys:
            raise ConfigError(
                f"training.dropout.{what}: model type {model_config.model_type!r} has no "
                f"{what} dropout setting (looked for {', '.join(DROPOUT_KEYS[what])})"
            )
        out.update({k: float(value) for k in keys})
    return out


def preflight(
    training: TrainingConfig,
    model_path: str,
    task_type: str,
    labels: list[str] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Check a strategy against the base model before anything is launched (cheap: the
    model is built on the meta device). Returns what the worker needs (and, given the run's
    ``labels``, ``head``: why the base model's own head is replaced, or None); raises
    ConfigError."""
    import torch
    from transformers import AutoConfig

    s = training.strategy
    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    overrides = dropout_overrides(training.dropout, cfg)
    task = get_task_type(task_type)
    with torch.device("meta"):
        model = task.model_from_config(cfg, ["a", "b"], trust_remote_code)
    pmap = parameter_map(model)
    n = pmap.num_layers
    if s.drop_top_layers and s.drop_top_layers >= n:
        raise ConfigError(
            f"training.strategy.drop_top_layers: {s.drop_top_layers} would leave no blocks; "
            f"the model has {n}"
        )
    remaining = n - s.drop_top_layers
    if s.kind == "last_n_layers" and (s.last_n_layers or 0) > remaining:
        raise ConfigError(
            f"training.strategy.last_n_layers: {s.last_n_layers} is more than the model's "
            f"{remaining} transformer blocks"
        )
    if s.kind == "lora":
        lora_targets(model, pmap, s.lora.target_modules if s.lora else ["attention"])
    if s.kind in ("head_only",) and not pmap.select({"head"}):
        raise ConfigError(f"training.strategy head_only: {task_type} model has no head")
    if s.init_embeddings_from:
        check_embeddings_source(model_path, s.init_embeddings_from)
    out: dict[str, Any] = {"config_overrides": overrides, "num_layers": n}
    if labels is not None:
        out["head"] = head_change(model_path, task_type, labels)
    return out


def check_embeddings_source(base_path: str, source: str) -> str:
    """Resolve ``init_embeddings_from``; ConfigError unless its vocabulary and embedding
    width equal the base model's."""
    from transformers import AutoConfig, AutoTokenizer

    from domaintune.models import resolve_pretrained

    src = resolve_pretrained(source).path
    where = f"training.strategy.init_embeddings_from {source!r}"
    try:
        theirs = AutoTokenizer.from_pretrained(src).get_vocab()
        their_cfg = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot load a tokenizer and config there: {exc}") from None
    ours = AutoTokenizer.from_pretrained(base_path).get_vocab()
    if theirs != ours:
        only_ours = sorted(set(ours) - set(theirs))[:5]
        only_theirs = sorted(set(theirs) - set(ours))[:5]
        moved = sorted(t for t in set(ours) & set(theirs) if ours[t] != theirs[t])[:5]
        raise ConfigError(
            f"{where}: vocabularies differ (base {len(ours)} tokens, source {len(theirs)}); "
            f"only in base: {only_ours}, only in source: {only_theirs}, different ids: {moved}"
        )
    ours_cfg = AutoConfig.from_pretrained(base_path)
    if getattr(their_cfg, "hidden_size", None) != getattr(ours_cfg, "hidden_size", None):
        raise ConfigError(
            f"{where}: embedding width {getattr(their_cfg, 'hidden_size', '?')} differs from "
            f"the base model's {getattr(ours_cfg, 'hidden_size', '?')}"
        )
    return src


# -------------------------------------------------------------------------- structure


def prepare_structure(model: Any, strategy: StrategyConfig, base_path: str) -> list[str]:
    """Architecture changes before training: drop top blocks, custom head, embeddings from
    another checkpoint. Deterministic given the RNG state (the head is initialised here)."""
    notes: list[str] = []
    if strategy.drop_top_layers:
        notes.append(drop_top_layers(model, strategy.drop_top_layers))
    if strategy.head is not None:
        notes.append(build_head(model, strategy.head))
    if strategy.init_embeddings_from:
        notes.append(init_embeddings(model, base_path, strategy.init_embeddings_from))
    return notes


def drop_top_layers(model: Any, k: int) -> str:
    import torch.nn as nn

    inner = model
    prefix = _base_prefix(inner)
    base = getattr(inner, prefix) if prefix else inner
    path, blocks, _ = _find_blocks(base, inner.config.model_type)
    keep = len(blocks) - k
    parent_path, _, attr = path.rpartition(".")
    parent = base.get_submodule(parent_path) if parent_path else base
    setattr(parent, attr, nn.ModuleList(list(blocks)[:keep]))
    cfg = inner.config
    for key in LAYER_COUNT_KEYS:
        if hasattr(cfg, key) and isinstance(getattr(cfg, key), int):
            setattr(cfg, key, keep)
            break
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:keep]
    return f"dropped the top {k} of {keep + k} blocks"


def _head_suffix(task_type: str) -> str:
    """The architecture suffix of a task's model class: ``ForSequenceClassification``."""
    return get_task_type(task_type).auto_model.removeprefix("AutoModel")


def head_change(model_path: str, task_type: str, labels: list[str]) -> str | None:
    """Why the task head saved with ``model_path`` (a registered model a run chains from)
    cannot serve ``task_type`` with ``labels``, or None when it can: the same task and label
    set keep the head (training continues it), and a folder without such a head (an encoder,
    a language model) gets a new one anyway. A head that does not fit is not loaded: the
    run starts from the encoder with a fresh head initialised from the seed
    (``domaintune.loading.load_task_model``), instead of a size-mismatch crash or, worse, a head of the
    same size that means other labels."""
    if not get_task_type(task_type).new_head:
        return None
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    found = [
        (arch, task)
        for arch in cfg.get("architectures") or []
        for task in _new_head_tasks()
        if arch.endswith(_head_suffix(task))
    ]
    if not found:
        return None
    arch, theirs = found[0]
    id2label = cfg.get("id2label") or {}
    their_labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    labelled = get_task_type(task_type).labelled_head
    if theirs == task_type and (not labelled or their_labels == list(labels)):
        return None
    was = f"{theirs}, {len(their_labels)} labels: {', '.join(their_labels)}"
    now = f"{len(labels)} labels: {', '.join(labels)}" if labelled else task_type
    return (
        f"its {arch} head ({was if get_task_type(theirs).labelled_head else theirs}) does not "
        f"fit this {task_type} run: dropped, and a fresh {_head_suffix(task_type)} head "
        f"({now}) is initialised from training.seed on its encoder"
    )


def fresh_head(model: Any, seed: int) -> None:
    """Initialise what the task model adds on top of its base model anew, from ``seed``, as
    the architecture initialises a new model (a same-sized head of another task loads
    without complaint, so it is not left to the loader)."""
    import transformers

    prefix = _base_prefix(model)
    if not prefix:
        return
    transformers.set_seed(seed)
    for name, child in model.named_children():
        if name == prefix:
            continue
        for module in child.modules():
            for p in module.parameters(recurse=False):
                p._is_hf_initialized = False  # loaded weights are marked: init would skip them
            model._init_weights(module)


def init_embeddings(model: Any, base_path: str, source: str) -> str:
    import torch
    from transformers import AutoModel

    src = check_embeddings_source(base_path, source)
    donor = (
        AutoModel.from_pretrained(src, use_safetensors=True).get_input_embeddings().weight.detach()
    )
    target = model.get_input_embeddings().weight
    if donor.shape != target.shape:
        raise ConfigError(
            f"training.strategy.init_embeddings_from {source!r}: embedding matrix "
            f"{tuple(donor.shape)} does not fit the model's {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(donor.to(target.dtype))
    return f"input embeddings from {source}"


# ---------------------------------------------------------------------------- freezing


def lora_targets(model: Any, pmap: ParameterMap, targets: list[str]) -> list[str]:
    """Full names of the linear layers LoRA adapts: component names expand to the linear
    layers in that component of every block; other entries match module names."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    linear = {
        name: mod for name, mod in inner.named_modules() if isinstance(mod, (nn.Linear, Conv1D))
    }
    owner = {}
    for info in pmap.params:
        for name in info.names:
            owner[name.rsplit(".", 1)[0]] = info
    chosen: list[str] = []
    for target in targets:
        if target in COMPONENTS:
            found = [
                n
                for n in linear
                if n in owner
                and target in owner[n].components
                and 1 <= owner[n].depth <= pmap.num_layers
            ]
        else:
            found = [n for n in linear if n == target or n.endswith("." + target)]
        if not found:
            leaf = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise ConfigError(
                f"training.strategy.lora.target_modules: {target!r} matches no linear layer of "
                f"model type {pmap.model_type!r}; components: attention, feed_forward; "
                f"layer names: {', '.join(leaf)}"
            )
        chosen += [n for n in found if n not in chosen]
    return chosen


def apply_strategy(
    model: Any, strategy: StrategyConfig, task_type: str
) -> tuple[Any, StrategyReport]:
    """Set requires_grad (or wrap in LoRA). Returns (model to train, report)."""
    pmap = parameter_map(model)
    total = sum(p.numel for p in pmap.params)
    notes = [f"components resolved by {pmap.resolved_by} ({pmap.model_type or 'unknown'})"]
    kind = strategy.kind
    if kind == "full":
        selected = {id(p.param) for p in pmap.params}
    elif kind == "head_only":
        selected = {id(p.param) for p in pmap.select({"head"})}
    elif kind == "components":
        selected = {id(p.param) for p in pmap.select(set(strategy.components or []))}
    elif kind == "last_n_layers":
        lowest = pmap.num_layers - int(strategy.last_n_layers or 0) + 1
        selected = {id(p.param) for p in pmap.params if p.depth >= lowest}
    else:  # lora: nothing of the base trains; the adapters (and a new head) do
        selected = set()
    if strategy.freeze_embeddings:
        selected -= {id(p.param) for p in pmap.select({"embeddings"})}
    for info in pmap.params:
        info.param.requires_grad_(id(info.param) in selected)
        if len(info.components) > 1 and id(info.param) in selected:
            notes.append(f"{info.names} are tied ({', '.join(sorted(info.components))})")
    if kind == "lora":
        model = _wrap_lora(model, pmap, strategy, task_type, notes)
        pmap = parameter_map(model)
    trainable = sum(p.numel for p in pmap.params if p.param.requires_grad)
    if trainable == 0:
        raise ConfigError(
            f"training.strategy {strategy.describe()}: no parameter of this "
            f"{pmap.model_type} model would train"
        )
    counts = component_counts(pmap)
    trained_blocks = sorted(
        {p.depth for p in pmap.params if p.param.requires_grad and 1 <= p.depth <= pmap.num_layers}
    )
    report = StrategyReport(
        strategy=strategy.describe(),
        kind=kind,
        trainable_parameters=trainable,
        total_parameters=total,
        trainable_share=round(trainable / total, 6),
        components=counts,
        num_layers=pmap.num_layers,
        trained_blocks=trained_blocks,
        notes=notes,
    )
    if kind == "lora":
        report.adapter_parameters = sum(
            p.numel for p in pmap.params if any(".lora_" in n for n in p.names)
        )
    return model, report


def _wrap_lora(
    model: Any, pmap: ParameterMap, strategy: StrategyConfig, task_type: str, notes: list[str]
) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = strategy.lora
    assert cfg is not None
    targets = lora_targets(model, pmap, cfg.target_modules)
    save = []
    if get_task_type(task_type).new_head:  # a new, untrained head trains with the adapters
        prefix = _base_prefix(model)
        save = [
            name
            for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())
        ]
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=save or None,
        bias="none",
    )
    notes.append(f"LoRA on {len(targets)} layers; trains with them: {save or 'nothing else'}")
    return get_peft_model(model, lora)


def merge_lora(model: Any, adapter_dir: str) -> Any:
    """The plain model: base (as prepared for training) + the saved adapter, merged."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


# -------------------------------------------------------------------------- optimizer


def param_groups(model: Any, training: TrainingConfig) -> tuple[list[dict], list[dict]]:
    """Optimizer groups of the trainable parameters: (groups, report rows)."""
    pmap = parameter_map(model)
    n = pmap.num_layers
    base_lr, head_lr, decay = (
        training.learning_rate,
        training.head_lr(),
        training.layerwise_lr_decay,
    )
    groups: dict[tuple[float, float], list[Any]] = defaultdict(list)
    labels: dict[tuple[float, float], set[str]] = defaultdict(set)
    for info in pmap.params:
        if not info.param.requires_grad:
            continue
        if info.components == {"head"}:
            lr, label = head_lr, "head"
        elif decay is not None and info.depth <= n:
            lr = base_lr * decay ** (n - info.depth)
            label = "embeddings" if info.depth == 0 else f"block {info.depth}"
        else:
            lr, label = base_lr, ("top" if info.depth > n else "body")
        wd = 0.0 if info.no_decay else training.weight_decay
        groups[(lr, wd)].append(info.param)
        labels[(lr, wd)].add(label)
    out, rows = [], []
    for (lr, wd), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        out.append({"params": params, "lr": lr, "weight_decay": wd})
        rows.append(
            {
                "lr": lr,
                "weight_decay": wd,
                "parameters": sum(p.numel() for p in params),
                "tensors": len(params),
                "parts": sorted(labels[(lr, wd)], key=_part_order),
            }
        )
    return out, rows


def _part_order(label: str) -> tuple[int, int]:
    if label.startswith("block "):
        return (1, int(label.split()[1]))
    return ({"embeddings": 0, "body": 1, "top": 2, "head": 3}.get(label, 4), 0)


def optimizer_state_elements(optimizer: Any) -> int | None:
    """Elements of Adam's first-moment state actually held (after training)."""
    import torch

    opt = optimizer
    for _ in range(4):  # DeepSpeed wraps the torch optimizer (ZeRO-1/2/3)
        if isinstance(opt, torch.optim.Optimizer) and opt.state:
            break
        opt = getattr(opt, "optimizer", None)
        if opt is None:
            return None
    return int(
        sum(
            s["exp_avg"].numel()
            for s in opt.state.values()
            if isinstance(s, dict) and "exp_avg" in s
        )
    )
