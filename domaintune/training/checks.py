"""Checks of a saved model before anything downstream trusts it.

The most reported failure of DeepSpeed fine-tuning is a ZeRO-3 run that "succeeds" and saves
a model of empty partitions (tensors of shape [0]) or only rank 0's shard, which then loads
with silently re-initialised weights. ``verify_saved_model`` reads the safetensors headers
(no tensor data), rejects empty tensors, loads the folder the way evaluation and serving
will (plain transformers), and checks that every parameter came from the files and that the
count equals what the training process built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from domaintune.errors import TrainingFailed


def saved_tensors(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of every safetensors file, from the headers alone."""
    import struct

    out: dict[str, tuple[int, ...]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                out[name] = tuple(meta["shape"])
    return out


def saved_weights(model_dir: Path | str) -> dict[str, Any]:
    """Every tensor of a saved model's safetensors files, by name."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_weight_difference(a_dir: Path | str, b_dir: Path | str) -> float:
    """The largest absolute difference between two saved models' weights (same tensors)."""
    a, b = saved_weights(a_dir), saved_weights(b_dir)
    if a.keys() != b.keys():
        raise ValueError(f"{a_dir} and {b_dir} hold different tensors: {set(a) ^ set(b)}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def verify_saved_model(
    model_dir: Path,
    task_type: str,
    labels: list[str],
    *,
    expected_parameters: int | None,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Raise ``TrainingFailed`` naming the tensor / count that is wrong; return what was
    checked (files, tensors, parameters, bytes)."""
    import math

    from domaintune.tasktypes import get_task_type

    where = f"finetune: saved model {model_dir}"
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise TrainingFailed(f"{where}: no .safetensors weights were written")
    shapes = saved_tensors(model_dir)
    empty = [k for k, s in shapes.items() if math.prod(s) == 0]
    if empty:
        raise TrainingFailed(
            f"{where}: {len(empty)} tensor(s) saved empty, e.g. {empty[0]} {shapes[empty[0]]}: "
            "ZeRO-3 partitions were not gathered (stage3_gather_16bit_weights_on_model_save)"
        )
    try:
        model = get_task_type(task_type).load_model(str(model_dir), labels, seed, trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any load failure is the finding
        raise TrainingFailed(
            f"{where}: does not load in plain transformers: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}"
        ) from exc

    # every parameter of the loaded model must come from the files (tied ones: one copy)
    state = model.state_dict()
    by_storage: dict[int, list[str]] = {}
    for name, tensor in state.items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    params = {p.data_ptr(): p for p in model.parameters()}
    for ptr, names in by_storage.items():
        if ptr not in params:
            continue  # buffers (position ids, ...) may be derived, not saved
        if not any(n in shapes for n in names):
            raise TrainingFailed(
                f"{where}: parameter {names[0]} is not in the saved files (it would load "
                "randomly initialised)"
            )
        for n in names:
            if n in shapes and tuple(state[n].shape) != shapes[n]:
                raise TrainingFailed(
                    f"{where}: {n} is saved as {shapes[n]}, the model needs {tuple(state[n].shape)}"
                )
    n_params = sum(p.numel() for p in params.values())
    if expected_parameters is not None and n_params != expected_parameters:
        raise TrainingFailed(
            f"{where}: holds {n_params:,} parameters, training built {expected_parameters:,} "
            "(a partial or wrongly gathered save)"
        )
    return {
        "files": [f.name for f in files],
        "tensors": len(shapes),
        "parameters": n_params,
        "bytes": sum(f.stat().st_size for f in files),
        "loads_in_transformers": True,
    }
