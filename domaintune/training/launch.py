"""Where and how the training ranks start: one CPU process up to all GPUs of many hosts.

``plan_launch`` turns the training config and what this machine has into a ``LaunchPlan``:
the hosts and ranks per host, the world size, precision, and the gradient accumulation that
keeps ``training.global_batch_size`` the same whatever the world size. ``LaunchPlan.command``
is the DeepSpeed launcher command line: on one host its per-node launcher
(``deepspeed.launcher.launch``), which starts one process per GPU (or ``cpu_processes`` gloo
ranks on a machine without a GPU); with a hostfile and ``num_nodes > 1`` its runner
(``deepspeed.launcher.runner``), which reaches the other hosts through pdsh / MPI / Slurm,
running the same module with the same spec file, which must therefore lie on a filesystem
every host sees.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from domaintune.config import Precision, TrainingConfig
from domaintune.errors import ConfigError, HostError, shown, utf8_text
from domaintune.storage.manifests import LaunchRecord

#: Environment variables the ranks need from the task's environment (names, or prefixes
#: ending in ``*``). With several hosts every rank is started over SSH and sees only these
#: (written to ``.deepspeed_env``, which DeepSpeed's launcher exports on each host) plus
#: ``training.forward_env`` and DeepSpeed's own PYTHON* / UCX* / MV2* / MLFLOW*. A secret-named
#: variable is never among them: the ranks read local files and need no credential.
FORWARDED_ENV = (
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "TORCH_EXTENSIONS_DIR",
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "TRANSFORMERS_OFFLINE",
    "DOMAINTUNE_CACHE",
    # the rank on the task's host ends itself when the task process is gone
    "DOMAINTUNE_TASK_PID",
    "DOMAINTUNE_TASK_HOST",
    "DOMAINTUNE_FAULT_*",  # fault injection (tests, bench/faults.py): set by hand only
    "NCCL_*",
    "GLOO_*",
)

#: Launchers that reach the other hosts over SSH (checked before the launch)
_SSH_LAUNCHERS = {"pdsh", "openmpi", "mpich", "impi", "mvapich"}


@dataclass
class LaunchPlan:
    hosts: list[tuple[str, int]]  # (host, ranks on it)
    use_gpu: bool
    #: chosen once (choose_precision); bf16 / fp16 below are views of it
    precision: Precision
    master_addr: str
    master_port: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    launcher: str = "pdsh"
    hostfile: str | None = None
    ssh_config: str | None = None
    ranks_per_node_arg: int | None = None  # --num_gpus (None: every slot of the hostfile)
    threads_per_rank: int = 1
    #: Whether the DeepSpeed ZeRO engine runs: with several ranks, or with CPU offload. One
    #: rank without offload has nothing to partition, and the engine only costs time
    #: (22% on the CPU throughput bench), so it trains with the plain torch optimizer.
    uses_zero: bool = True
    notes: list[str] = field(default_factory=list)
    #: why this precision: what was detected and chosen ("bf16: this CPU has amx_bf16, ...")
    precision_reason: str = ""

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
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def fp16(self) -> bool:
        return self.precision == "fp16"

    def command(self, spec_path: Path | str, cpu_allocator: str = "auto") -> list[str]:
        """The launch command; a CPU rank is told which allocator to restart itself with
        (``training.cpu_allocator``) on its command line, read before anything heavy loads."""
        worker = ["domaintune.training.worker", "--spec", str(spec_path)]
        if not self.use_gpu:
            worker += ["--cpu-allocator", cpu_allocator]
        if not (self.hostfile and (self.multi_node or not _is_local(self.hosts[0][0]))):
            # one local host: DeepSpeed's per-node launcher directly, with the world its
            # runner would compute ({"localhost": [0 .. ranks-1]}); the runner's only work on
            # one host is to import DeepSpeed (~1.5 s on 2 cores) and start this command
            world = {"localhost": list(range(self.ranks_per_node_arg or self.hosts[0][1]))}
            encoded = base64.urlsafe_b64encode(json.dumps(world).encode()).decode()
            return [
                sys.executable, "-u", "-m", "deepspeed.launcher.launch",
                f"--world_info={encoded}",
                f"--master_addr={self.master_addr}",
                f"--master_port={self.master_port}",
                "--module", "--no_local_rank", "--log_level=info",
                *worker,
            ]  # fmt: skip
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
        cmd += ["--hostfile", self.hostfile, "--num_nodes", str(self.num_nodes)]
        cmd += ["--launcher", self.launcher]
        if self.launcher in _SSH_LAUNCHERS:
            cmd += ["--no_ssh_check"]  # check_hosts did it, with errors that say what failed
        if self.ranks_per_node_arg is not None:
            cmd += ["--num_gpus", str(self.ranks_per_node_arg)]
        cmd += [
            "--master_addr", self.master_addr,
            "--master_port", str(self.master_port),
            "--no_local_rank",
            "--module", *worker,
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

    def summary(self, zero_stage: int | None = None) -> LaunchRecord:
        """The plan as the ranks get it and the artifact keeps it (``zero_stage``: the
        config's, when the plan runs a ZeRO engine)."""
        return LaunchRecord(
            world_size=self.world_size,
            num_nodes=self.num_nodes,
            hosts=[list(h) for h in self.hosts],
            device="gpu" if self.use_gpu else "cpu",
            precision=self.precision,
            precision_reason=self.precision_reason,
            micro_batch_size=self.micro_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            global_batch_size=self.global_batch_size,
            zero_engine=self.uses_zero,
            zero_stage=zero_stage if self.uses_zero else None,
        )


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """The hosts and slots of a hostfile, read by DeepSpeed's own parser (what its launcher
    will read: ``<host> slots=<n>`` lines, anything after that such as ``max_slots=8``
    accepted, ``#`` comments), with errors that name the file, the line and the rule.

    A hostfile that cannot be read is a ``HostError`` (retryable: a scheduler writes it as
    the hosts come up); one that DeepSpeed rejects, or that is not UTF-8 text, is a
    ``ConfigError``."""
    import logging

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise HostError(f"training.hostfile {path}: cannot be read ({exc.strerror})") from None
    text = utf8_text(
        data,
        f"training.hostfile {path}",
        "a hostfile is UTF-8 text, '<host> slots=<n>' per line",
        ConfigError,
    )
    # lines as DeepSpeed reads them (and editors count them): at \n, \r\n or \r
    lines = re.split(r"\r\n|\r|\n", text)
    from deepspeed.launcher.runner import fetch_hostfile
    from deepspeed.utils import logger as ds_logger

    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL)  # it logs the whole file before raising
    try:
        pool = fetch_hostfile(path)
    except ValueError as exc:
        raise ConfigError(_hostfile_problem(path, lines, str(exc))) from None
    finally:
        ds_logger.setLevel(level)
    if pool is None:  # removed since it was read
        raise HostError(f"training.hostfile {path}: cannot be read (it is gone)")
    for host, slots in pool.items():
        if slots < 1:
            lineno = next((i for i, ln in enumerate(lines, 1) if ln.split()[:1] == [host]), "?")
            raise ConfigError(
                f"training.hostfile {path}, line {lineno}: host {shown(host)} has slots={slots}; "
                "a host needs slots >= 1"
            )
    return list(pool.items())


def _hostfile_problem(path: str, lines: list[str], message: str) -> str:
    """DeepSpeed's complaint about a hostfile as one line naming the file and the line."""
    bad = re.search(r"bad entry: (.*), unable to proceed", message)
    if bad:
        lineno = next((i for i, ln in enumerate(lines, 1) if ln.strip() == bad[1]), "?")
        return (
            f"training.hostfile {path}, line {lineno}: expected '<host> slots=<n>' "
            f"(DeepSpeed's format), got {shown(bad[1], quote=True)}"
        )
    twice = re.search(r"multiple entries for (\S+),", message)
    if twice:
        seen = [i for i, ln in enumerate(lines, 1) if ln.split()[:1] == [twice[1]]]
        lineno = seen[1] if len(seen) > 1 else "?"
        host = shown(twice[1], quote=True)
        return f"training.hostfile {path}, line {lineno}: host {host} is listed twice"
    if "empty" in message:
        return f"training.hostfile {path}: lists no hosts"
    if "integer string conversion" in message:  # Python's limit on int("9" * 5000)
        long = (i for i, ln in enumerate(lines, 1) if re.search(r"slots=\d{4000}", ln))
        lineno = next(long, "?")
        return f"training.hostfile {path}, line {lineno}: slots=<n> is not a usable number"
    return f"training.hostfile {path}: {shown(message)}"


def check_hosts(
    plan: LaunchPlan, workdir: Path, *, python: str = sys.executable, timeout: float = 15
) -> dict[str, str]:
    """Before a launch over SSH: every host answers, accepts the key, has this environment
    (``python``) and sees ``workdir`` (the store's cache on a shared filesystem). One
    ``HostError`` naming the host and what failed; otherwise each host's answer (its
    hostname). Hosts are checked at once, each bounded by ``timeout`` seconds."""
    import shlex
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    if not (plan.multi_node and plan.launcher in _SSH_LAUNCHERS):
        return {}
    where = f"training.hostfile {plan.hostfile}"
    probe = (
        f"test -x {shlex.quote(python)} || exit 101; "
        f"test -d {shlex.quote(str(workdir))} || exit 102; hostname"
    )

    def ask(host: str) -> tuple[str, int, str, str]:
        cmd = ["ssh", *ssh_options(plan.ssh_config, timeout), host, probe]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout + 10, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError:
            raise HostError(
                f"{where}: ssh is not installed on this host (it reaches the other hosts)"
            ) from None
        except subprocess.TimeoutExpired:
            return host, -1, "", ""
        return host, done.returncode, done.stdout.strip(), done.stderr.strip()

    answers: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=min(16, plan.num_nodes)) as pool:
        for host, rc, out, err in pool.map(ask, [h for h, _ in plan.hosts]):
            if rc == 0:
                answers[host] = out
                continue
            raise HostError(
                f"{where}: host {host} {_ssh_failure(rc, err, timeout, python, workdir)}"
            )
    return answers


def ssh_options(ssh_config: str | None, timeout: float = 15) -> list[str]:
    """ssh's options for the host check: never a prompt, bounded in time."""
    opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}"]
    return (["-F", ssh_config] if ssh_config else []) + opts


def _ssh_failure(rc: int, stderr: str, timeout: float, python: str, workdir: Path) -> str:
    if rc == 101:
        return (
            f"has no {python}: every host needs the project's environment at the same path "
            "(make install there, or the same image)"
        )
    if rc == 102:
        return (
            f"does not see {workdir}: the store's cache (DOMAINTUNE_CACHE) must be on a "
            "filesystem every host shares, at the same path"
        )
    if rc == -1:
        return f"did not answer over SSH within {timeout + 10:.0f} s"
    said = [ln.removeprefix("ssh: ").strip() for ln in stderr.splitlines() if ln.strip()]
    last = said[-1].rstrip(".") if said else f"ssh exited with code {rc}"
    low = stderr.lower()
    if "permission denied" in low:
        why = "refused the SSH key"
        hint = "its authorized_keys must hold this host's public key (passwordless SSH)"
    elif "connection refused" in low:
        why = "refused the SSH connection"
        hint = "is sshd running there, on the port the SSH config names?"
    elif "timed out" in low or "no route" in low or "unreachable" in low:
        why = "is unreachable over SSH"
        hint = "is the host up, and is its SSH port open to this host?"
    elif "could not resolve" in low or "name or service not known" in low:
        why = "has a name that does not resolve"
        hint = "check the name in the hostfile (or add it to the SSH config)"
    elif "host key verification failed" in low:
        why = "has an SSH host key this host does not know (or a changed one)"
        hint = "add it to known_hosts"
    else:
        why, hint = "failed the SSH check", f"the remote command exited with code {rc}"
    return f"{why} ({last}): {hint}"


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


#: Processor features that do bf16 arithmetic in hardware: Intel AMX tiles, AVX512-BF16
#: dot products (Intel Cooper Lake+, AMD Zen 4+), the Arm BF16 extension. Without one of them
#: PyTorch emulates bf16 with conversions, which is slower than fp32.
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_bf16_features(cpuinfo: str | None = None) -> list[str]:
    """The bf16 instructions this processor has (``/proc/cpuinfo`` flags on Linux, the
    ``hw.optional.arm.FEAT_BF16`` sysctl on macOS); empty when it has none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, aarch64
            flags.update(value.split())
            break  # every core reports the same
    if not flags and sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out == "1":
            flags.add("bf16")
    return [f for f in CPU_BF16_FEATURES if f in flags]


def choose_precision(
    configured: str, *, use_gpu: bool, gpu_bf16: bool, cpu_bf16: list[str]
) -> tuple[Precision, str, str | None]:
    """(precision, why, warning or None) for ``training.precision`` on this hardware.

    bf16 is mixed precision: fp32 master weights, bf16 autocast. ``auto`` picks it where the
    hardware does bf16 arithmetic: GPUs that support it (older ones get fp16), CPUs with AMX
    or AVX512-BF16 (or Arm BF16); other CPUs train in fp32."""
    has = f"this CPU has {', '.join(cpu_bf16)}" if cpu_bf16 else ""
    lacks = "this CPU has no bf16 instructions (AMX, AVX512-BF16 or Arm BF16)"
    if configured == "auto":
        if use_gpu:
            return (
                ("bf16", "bf16: the GPU supports it", None)
                if gpu_bf16
                else ("fp16", "fp16: the GPU has no bf16", None)
            )
        if cpu_bf16:
            return "bf16", f"bf16 autocast: {has}", None
        return "fp32", f"fp32: {lacks}", None
    if configured == "bf16":
        if use_gpu:
            if not gpu_bf16:
                raise ConfigError(
                    "training.precision bf16: this GPU does not support bf16; use fp16"
                )
            return "bf16", "bf16: as configured", None
        if cpu_bf16:
            return "bf16", f"bf16 autocast: as configured ({has})", None
        # a warning, not an error: the numbers are right (PyTorch emulates bf16), only
        # slower, and one config then runs on a bf16 server and on a laptop alike
        return (
            "bf16",
            f"bf16 autocast: as configured, emulated: {lacks}",
            f"training.precision bf16: {lacks}, so PyTorch emulates bf16, usually slower than "
            "fp32 (precision auto picks fp32 on such a CPU)",
        )
    if configured == "fp16":
        if not use_gpu:
            raise ConfigError(
                "training.precision fp16 needs a GPU; on CPU use bf16 or fp32 (or auto)"
            )
        return "fp16", "fp16: as configured", None
    return "fp32", "fp32: as configured", None


def inference_precision(training: TrainingConfig) -> tuple[Precision, str]:
    """(precision, why) for scoring models on this machine: the training's choice, so that
    evaluation and base-model scoring run as the training did."""
    gpus, gpu_bf16 = visible_gpus()
    precision, reason, _ = choose_precision(
        training.precision,
        use_gpu=gpus > 0,
        gpu_bf16=gpu_bf16,
        cpu_bf16=[] if gpus else cpu_bf16_features(),
    )
    return precision, reason


def plan_launch(
    training: TrainingConfig,
    *,
    gpus: int | None = None,
    bf16_supported: bool | None = None,
    cpu_count: int | None = None,
    cpu_bf16: list[str] | None = None,
) -> LaunchPlan:
    """The launch for this config on this machine (``gpus`` / ``bf16_supported`` /
    ``cpu_count`` / ``cpu_bf16`` override what is detected, for planning another machine's
    run)."""
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
            raise HostError(
                f"training.hostfile {hostfile}: training.num_nodes is {training.num_nodes} "
                f"but it lists {len(listed)} host(s) ({', '.join(h for h, _ in listed)}): "
                f"{training.num_nodes - len(listed)} host(s) missing"
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

    if not use_gpu and cpu_bf16 is None:
        cpu_bf16 = cpu_bf16_features()
    precision, reason, warning = choose_precision(
        training.precision, use_gpu=use_gpu, gpu_bf16=bf16_supported, cpu_bf16=cpu_bf16 or []
    )
    if warning:
        notes.append(warning)

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
        precision=precision,
        master_addr=training.master_addr or default_addr,
        master_port=training.master_port or free_port(),
        micro_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        launcher=training.launcher,
        hostfile=hostfile,
        ssh_config=training.ssh_config,
        ranks_per_node_arg=ranks_arg,
        threads_per_rank=max(1, cores // max(1, hosts[0][1])),
        notes=notes,
        precision_reason=reason,
    )


def _is_local(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", socket.gethostname())


def child_env(plan: LaunchPlan, base: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment: CPU ranks use gloo and share the cores. Secret-named
    variables are left out: no rank needs one, and DeepSpeed's multi-node launcher would
    put some of them (MLFLOW*) on the command line it logs and runs on every host."""
    from domaintune.redaction import is_secret_name

    env = {k: v for k, v in (os.environ if base is None else base).items() if not is_secret_name(k)}
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
    if plan.ssh_config and plan.multi_node:  # pdsh runs ssh with these options appended
        env["PDSH_SSH_ARGS_APPEND"] = f"{env.get('PDSH_SSH_ARGS_APPEND', '')} -F {plan.ssh_config}"
    return env


def forwarded_env(env: dict[str, str], extra: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """The variables of ``env`` that the ranks on other hosts get: ``FORWARDED_ENV`` and
    ``extra`` (names or ``PREFIX*``), never a secret-named one or a multi-line value."""
    from domaintune.redaction import is_secret_name

    wanted = (*FORWARDED_ENV, *extra)
    names = {w for w in wanted if not w.endswith("*")}
    prefixes = tuple(w[:-1] for w in wanted if w.endswith("*"))
    return {
        k: v
        for k, v in sorted(env.items())
        if (k in names or k.startswith(prefixes)) and v and "\n" not in v and not is_secret_name(k)
    }


def write_deepspeed_env(
    workdir: Path, env: dict[str, str], extra: tuple[str, ...] | list[str] = ()
) -> Path:
    """``.deepspeed_env`` in the launcher's working folder: what ranks on other hosts get."""
    lines = [f"{k}={v}" for k, v in forwarded_env(env, extra).items()]
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
