"""Where and how the training ranks start: one CPU process up to all GPUs of many hosts.

``plan_launch`` turns the training config and what this machine has into a ``LaunchPlan``:
the hosts and ranks per host, the world size, precision, and the gradient accumulation that
keeps ``training.global_batch_size`` the same whatever the world size. ``LaunchPlan.command``
is the DeepSpeed launcher command line (``deepspeed.launcher.runner``): locally it starts one
process per GPU (or ``cpu_processes`` gloo ranks on a machine without a GPU); with a hostfile
and ``num_nodes > 1`` it reaches the other hosts through pdsh / MPI / Slurm, running the same
module with the same spec file, which must therefore lie on a filesystem every host sees.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domaintune.config import TrainingConfig
from domaintune.errors import ConfigError

#: Environment variables a rank on another host needs from this one (DeepSpeed itself only
#: forwards PYTHON*, UCX*, MV2* ... and the ``.deepspeed_env`` file written for it). Secrets
#: are deliberately not in it.
FORWARDED_ENV = (
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "TORCH_EXTENSIONS_DIR",
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "TRANSFORMERS_OFFLINE",
    "DOMAINTUNE_CACHE",
    "NCCL_SOCKET_IFNAME",
    "NCCL_IB_DISABLE",
    "GLOO_SOCKET_IFNAME",
)


@dataclass
class LaunchPlan:
    hosts: list[tuple[str, int]]  # (host, ranks on it)
    use_gpu: bool
    bf16: bool
    fp16: bool
    master_addr: str
    master_port: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    launcher: str = "pdsh"
    hostfile: str | None = None
    ranks_per_node_arg: int | None = None  # --num_gpus (None: every slot of the hostfile)
    threads_per_rank: int = 1
    #: Whether the DeepSpeed ZeRO engine runs: with several ranks, or with CPU offload. One
    #: rank without offload has nothing to partition, and the engine only costs time
    #: (22% on the CPU throughput bench), so it trains with the plain torch optimizer.
    uses_zero: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return sum(n for _, n in self.hosts)

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)

    @property
    def multi_node(self) -> bool:
        return self.num_nodes > 1

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def command(self, spec_path: Path | str) -> list[str]:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
        if self.hostfile and (self.multi_node or not _is_local(self.hosts[0][0])):
            cmd += ["--hostfile", self.hostfile, "--num_nodes", str(self.num_nodes)]
            cmd += ["--launcher", self.launcher]
        # one local host: started directly (the runner would first try ssh to localhost)
        if self.ranks_per_node_arg is not None:
            cmd += ["--num_gpus", str(self.ranks_per_node_arg)]
        cmd += [
            "--master_addr", self.master_addr,
            "--master_port", str(self.master_port),
            "--no_local_rank",
            "--module", "domaintune.training.worker",
            "--spec", str(spec_path),
        ]  # fmt: skip
        return cmd

    def describe(self) -> str:
        where = (
            f"{self.num_nodes} nodes ({', '.join(f'{h}x{n}' for h, n in self.hosts)})"
            if self.multi_node
            else f"{self.world_size} {'GPU' if self.use_gpu else 'CPU'} rank(s)"
        )
        return (
            f"{where}, world size {self.world_size}, {self.precision}, global batch "
            f"{self.global_batch_size} = {self.micro_batch_size} per rank x "
            f"{self.gradient_accumulation_steps} accumulation x {self.world_size} ranks"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "num_nodes": self.num_nodes,
            "hosts": [list(h) for h in self.hosts],
            "device": "gpu" if self.use_gpu else "cpu",
            "precision": self.precision,
            "micro_batch_size": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "global_batch_size": self.global_batch_size,
            "zero_engine": self.uses_zero,
        }


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """``host slots=N`` lines (comments and blank lines ignored), as DeepSpeed reads them."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"training.hostfile {path}: cannot be read ({exc.strerror})") from None
    hosts: list[tuple[str, int]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or not slots or not slots[0][6:].isdigit() or int(slots[0][6:]) < 1:
            raise ConfigError(
                f"training.hostfile {path}, line {lineno}: expected '<host> slots=<n>' with "
                f"n >= 1, got {raw.strip()!r}"
            )
        if any(h == parts[0] for h, _ in hosts):
            raise ConfigError(
                f"training.hostfile {path}, line {lineno}: host {parts[0]!r} is listed twice"
            )
        hosts.append((parts[0], int(slots[0][6:])))
    if not hosts:
        raise ConfigError(f"training.hostfile {path}: lists no hosts")
    return hosts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpus() -> tuple[int, bool]:
    """(GPUs visible to this process, whether they support bf16)."""
    import torch

    if not torch.cuda.is_available():
        return 0, False
    return torch.cuda.device_count(), bool(torch.cuda.is_bf16_supported())


def plan_launch(
    training: TrainingConfig,
    *,
    gpus: int | None = None,
    bf16_supported: bool | None = None,
    cpu_count: int | None = None,
) -> LaunchPlan:
    """The launch for this config on this machine (``gpus`` / ``bf16_supported`` /
    ``cpu_count`` override what is detected, for planning another machine's run)."""
    if gpus is None or bf16_supported is None:
        seen, bf16_ok = visible_gpus()
        gpus = seen if gpus is None else gpus
        bf16_supported = bf16_ok if bf16_supported is None else bf16_supported
    cores = cpu_count or os.cpu_count() or 1
    use_gpu = gpus > 0
    notes: list[str] = []

    if use_gpu:
        if training.num_gpus == "auto":
            per_node: int | None = gpus
        else:
            per_node = int(training.num_gpus)
            if per_node > gpus and not training.hostfile:
                notes.append(f"num_gpus {per_node} but {gpus} visible: using {gpus}")
                per_node = gpus
    else:
        per_node = training.cpu_processes
        if training.num_gpus not in ("auto", 0):
            notes.append(
                f"num_gpus {training.num_gpus} but no GPU is visible: "
                f"{training.cpu_processes} CPU rank(s) instead"
            )
    per_node = max(1, per_node) if per_node is not None else None

    hostfile = training.hostfile
    if hostfile:
        listed = read_hostfile(hostfile)
        if training.num_nodes > len(listed):
            raise ConfigError(
                f"training.num_nodes is {training.num_nodes} but training.hostfile {hostfile} "
                f"lists {len(listed)} host(s)"
            )
        chosen = listed[: training.num_nodes]
        # with num_gpus auto on several nodes, every slot; otherwise at most per_node each
        auto_slots = use_gpu and training.num_gpus == "auto" and len(chosen) > 1
        hosts = [(h, s if auto_slots else min(s, per_node or s)) for h, s in chosen]
        ranks_arg = None if auto_slots else per_node
        default_addr = "127.0.0.1" if len(hosts) == 1 and _is_local(hosts[0][0]) else hosts[0][0]
    else:
        hosts = [("localhost", per_node or 1)]
        ranks_arg = per_node or 1
        default_addr = "127.0.0.1"

    # precision
    p = training.precision
    if p == "auto":
        bf16, fp16 = (bf16_supported, not bf16_supported) if use_gpu else (False, False)
    elif p == "bf16":
        if use_gpu and not bf16_supported:
            raise ConfigError("training.precision bf16: this GPU does not support bf16; use fp16")
        bf16, fp16 = True, False
    elif p == "fp16":
        if not use_gpu:
            raise ConfigError(
                "training.precision fp16 needs a GPU; on CPU use bf16 or fp32 (or auto)"
            )
        bf16, fp16 = False, True
    else:
        bf16 = fp16 = False

    world = sum(n for _, n in hosts)
    micro = training.batch_size
    if training.global_batch_size is not None:
        per_step = micro * world
        if training.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size {training.global_batch_size} is not a multiple of "
                f"batch_size {micro} x {world} rank(s) = {per_step}; choose a multiple of "
                f"{per_step} or change batch_size"
            )
        accumulation = training.global_batch_size // per_step
    else:
        accumulation = training.gradient_accumulation_steps

    ds = training.deepspeed
    offload = ds.offload_optimizer or ds.offload_parameters
    uses_zero = world > 1 or offload
    if not uses_zero and ds.zero_stage > 0:
        notes.append(
            f"ZeRO-{ds.zero_stage} partitions across ranks; with one rank and no offload there "
            "is nothing to partition: training without the ZeRO engine"
        )
    return LaunchPlan(
        hosts=hosts,
        uses_zero=uses_zero,
        use_gpu=use_gpu,
        bf16=bf16,
        fp16=fp16,
        master_addr=training.master_addr or default_addr,
        master_port=training.master_port or free_port(),
        micro_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        launcher=training.launcher,
        hostfile=hostfile,
        ranks_per_node_arg=ranks_arg,
        threads_per_rank=max(1, cores // max(1, hosts[0][1])),
        notes=notes,
    )


def _is_local(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", socket.gethostname())


def child_env(plan: LaunchPlan, base: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment: CPU ranks use gloo and share the cores."""
    env = dict(os.environ if base is None else base)
    env.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "domaintune" / "torch_extensions")
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # ranks end themselves if this (task) process dies without stopping them
    env["DOMAINTUNE_TASK_PID"] = str(os.getpid())
    env["DOMAINTUNE_TASK_HOST"] = socket.gethostname()
    if not plan.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(plan.threads_per_rank)
    return env


def write_deepspeed_env(workdir: Path, env: dict[str, str]) -> Path:
    """``.deepspeed_env`` in the launcher's working folder: what ranks on other hosts get."""
    lines = [f"{k}={env[k]}" for k in FORWARDED_ENV if env.get(k) and "\n" not in env[k]]
    path = workdir / ".deepspeed_env"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def remove_shared_memory(plan: LaunchPlan, shm: Path = Path("/dev/shm")) -> list[str]:
    """Remove this launch's DeepSpeed CPU all-reduce buffers (``deepspeed_allreduce_buffer_
    <uid>_<addr>_<port>_<rank>``, 66 MB per rank). DeepSpeed never unlinks them, so without
    this every CPU training run leaks them into /dev/shm (RAM) until the machine runs out of
    memory. The port is unique to the launch, so other runs' buffers are left alone."""
    if not shm.is_dir():
        return []
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_{plan.master_addr}_{plan.master_port}_*"
    removed = []
    for f in shm.glob(pattern):
        try:
            f.unlink()
            removed.append(f.name)
        except OSError:
            pass
    return removed
