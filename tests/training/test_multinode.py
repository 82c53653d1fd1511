"""Multi-node DeepSpeed for real, on this one machine: two hosts, 127.0.0.1 and 127.0.0.2,
each reached over SSH (one ``sshd`` listening on a free port of both addresses, keys and an
SSH config generated for the test), one gloo CPU rank on each, rank 0 listening on
127.0.0.1. Training goes through DeepSpeed's own runner and pdsh exactly as on real hosts:
even the rank on 127.0.0.1 is started over SSH, with only what ``.deepspeed_env`` carries.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from domaintune.config import TrainingConfig
from domaintune.errors import HostError
from domaintune.storage.store import Store
from domaintune.tasks import finetune as finetune_stage
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.training.checks import max_weight_difference
from domaintune.training.launch import check_hosts, plan_launch
from tests.conftest import write_csv
from tests.services import free_port, make_ssh_key, ssh_hosts, ssh_tools_missing

pytestmark = pytest.mark.skipif(ssh_tools_missing() is not None, reason=ssh_tools_missing() or "")

#: secrets in the task's environment: none may reach a rank, a command line or a file
SECRETS = {
    "HF_TOKEN": "hf_" + "Q" * 30,
    "AWS_SECRET_ACCESS_KEY": "aws-secret-0123456789abcdef",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-password-0123456789",  # DeepSpeed exports MLFLOW*
}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with ssh_hosts(tmp_path_factory.mktemp("ssh")) as found:
        yield found


def _config(make_config, tmp_path, rows, hosts=None, zero=2, retries=0, **training):
    """The tiny model on 16 rows, global batch 8 = 4 per rank x 2 ranks (x 1 accumulation):
    on two hosts (one rank each) when ``hosts`` is given, else two ranks on this host."""
    src = write_csv(tmp_path / "d.csv", rows(16))
    where = (
        {
            "num_nodes": 2,
            "hostfile": str(hosts.hostfile(tmp_path / "hostfile")),
            "ssh_config": str(hosts.ssh_config),
        }
        if hosts
        else {"cpu_processes": 2}
    )
    return make_config(
        src,
        training={
            "batch_size": 4,
            "global_batch_size": 8,
            "max_steps": 4,
            "epochs": 1,
            "learning_rate": 5e-3,
            "deepspeed": {"zero_stage": zero},
            # the trainings here are compared weight by weight to 1e-5 with runs on one host:
            # fp32, where summing gradients in another order moves a weight by a few ulps
            # (under bf16 autocast such a difference can flip a bf16 rounding: 4e-5 seen)
            "precision": "fp32",
            **where,
            **training,
        },
        store={"root": str(tmp_path / "store")},
        retries={"count": retries, "delay_seconds": 0},
    )


def _train(cfg):
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    return finetune_stage.finetune(cfg, splits, store), store, splits


def _launch_processes(spec: Path) -> list:
    """Every process of a launch on either host (runner, pdsh, ssh, sshd's shells, the
    per-host launchers, the ranks): all carry the spec file's path on their command line."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if str(spec) in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _rank(spec: Path, rank: int, deadline: float):
    """(process, environment) of the rank ``rank`` of the launch using ``spec``."""
    import psutil

    while time.time() < deadline:
        for p in _launch_processes(spec):
            try:
                if "domaintune.training.worker" in p.cmdline():
                    env = p.environ()
                    if env.get("RANK") == str(rank):
                        return p, env
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never started")


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ------------------------------------------------------------- the host check (no training)


def test_the_host_check_names_the_host_and_what_failed(tmp_path, hosts):
    """Before any launch: every host answers, takes the key, has the environment and
    sees the working folder; otherwise one line naming the host and what failed."""

    def plan(ssh_config):
        return plan_launch(
            TrainingConfig(
                num_nodes=2,
                hostfile=str(hosts.hostfile(tmp_path / "hostfile")),
                ssh_config=str(ssh_config),
            )
        )

    answers = check_hosts(plan(hosts.ssh_config), tmp_path)
    assert list(answers) == ["127.0.0.1", "127.0.0.2"]
    assert set(answers.values()) == {socket.gethostname()}

    failures = {
        "wrong port": (
            plan(hosts.config("wrong-port", ports={"127.0.0.2": free_port()})),
            {},
            r"host 127.0.0.2 refused the SSH connection \(connect to host 127.0.0.2 port \d+: "
            r"Connection refused\): is sshd running there",
        ),
        "refused key": (
            plan(hosts.config("other-key", key=make_ssh_key(tmp_path / "not_authorized"))),
            {},
            r"host 127.0.0.1 refused the SSH key \(.*Permission denied \(publickey\)\)",
        ),
        "no environment": (
            plan(hosts.ssh_config),
            {"python": "/opt/elsewhere/bin/python"},
            r"host 127.0.0.1 has no /opt/elsewhere/bin/python: every host needs the project's "
            r"environment at the same path",
        ),
        "no shared folder": (
            plan(hosts.ssh_config),
            {"workdir": tmp_path / "only-on-one-host"},
            r"host 127.0.0.1 does not see .*only-on-one-host: the store's cache "
            r"\(DOMAINTUNE_CACHE\) must be on a filesystem every host shares",
        ),
    }
    for case, (launch, kwargs, message) in failures.items():
        kwargs.setdefault("workdir", tmp_path)
        with pytest.raises(HostError, match=message) as caught:
            check_hosts(launch, **kwargs)
        assert "\n" not in str(caught.value), case
        assert str(caught.value).startswith(f"training.hostfile {tmp_path / 'hostfile'}: ")

    # a host that takes the connection and never answers (a hung machine, a black hole)
    with socket.socket() as silent:
        silent.bind(("127.0.0.2", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        t0 = time.time()
        with pytest.raises(HostError, match=r"host 127.0.0.2 is unreachable over SSH \(.*timed"):
            check_hosts(
                plan(hosts.config("silent", ports={"127.0.0.2": port})), tmp_path, timeout=2
            )
        assert time.time() - t0 < 15, "the check is bounded in time"


# --------------------------------------------------------------- real two-host trainings


@pytest.mark.slow
def test_zero3_across_two_hosts_matches_one_host_and_sends_no_secret(
    tmp_path, make_config, rows, hosts, monkeypatch
):
    """ZeRO-3 partitions the parameters across the two hosts; the saved model loads in
    plain transformers with every parameter, and its weights match two ranks on one host
    (same global batch) within 1e-5: fp32 throughout, and the runs differ only in how the
    gradients are summed (DeepSpeed's shared-memory all-reduce on one host, gloo over TCP
    across hosts), a few ulps a step; a wrong or lost gradient moves a weight by about the
    learning rate (5e-3). A variable the user forwards reaches the remote rank; no secret
    reaches any rank, command line, ``.deepspeed_env`` or the log."""
    from transformers import AutoModelForSequenceClassification

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RISK_TEAM", "credit-risk-emea")
    cfg = _config(make_config, tmp_path / "two", rows, hosts, zero=3, forward_env=["RISK_*"])
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    key, _, _ = finetune_stage.plan(cfg, splits)
    work = store.scratch_dir("finetune", key)
    seen: dict = {}

    def watch() -> None:  # while it trains: what the remote rank and every process carry
        try:
            proc, seen["env"] = _rank(work / "spec.json", 1, time.time() + 120)
            seen["deepspeed_env"] = (work / ".deepspeed_env").read_text()
            seen["command_lines"] = [
                " ".join(p.cmdline()) for p in _launch_processes(work / "spec.json")
            ]
        except Exception as exc:  # reported below
            seen["error"] = exc

    watcher = threading.Thread(target=watch)
    watcher.start()
    model, _, _ = _train(cfg)
    watcher.join()
    assert "error" not in seen, seen.get("error")

    remote = seen["env"]
    assert remote["SSH_CONNECTION"].split()[2] == "127.0.0.2", "rank 1 runs on the second host"
    assert remote["RISK_TEAM"] == "credit-risk-emea" and remote["HF_HUB_OFFLINE"] == "1"
    assert remote["MASTER_ADDR"] == "127.0.0.1" and remote["WORLD_SIZE"] == "2"
    everything = "\n".join(
        [
            *remote.values(),
            seen["deepspeed_env"],
            *seen["command_lines"],
            (Path(model.model_dir) / "train.log").read_text(),
        ]
    )
    assert "RISK_TEAM=credit-risk-emea" in seen["deepspeed_env"]
    for name, value in SECRETS.items():
        assert value not in everything, f"{name} reached the ranks or their files"
        assert name not in remote

    summary = json.loads((Path(model.model_dir) / "training_summary.json").read_text())
    ranks = summary["ranks"]
    assert [r["ssh_address"] for r in ranks] == ["127.0.0.1", "127.0.0.2"]
    assert [r["node_rank"] for r in ranks] == [0, 1] and model.launch.num_nodes == 2
    held = [r["parameter_elements"] for r in ranks]
    total = model.total_parameters
    assert sum(held) >= total and max(held) < 0.6 * total, f"ZeRO-3 partitions: {held} of {total}"
    log = (Path(model.model_dir) / "train.log").read_text()
    assert "cmd = pdsh" in log and "127.0.0.2: " in log, "started through pdsh over SSH"

    loaded = AutoModelForSequenceClassification.from_pretrained(model.model_dir)
    assert sum(p.numel() for p in loaded.parameters()) == total == model.saved_model.parameters

    one_host, _, _ = _train(_config(make_config, tmp_path / "one", rows, zero=3))
    assert one_host.launch.num_nodes == 1 and one_host.launch.world_size == 2
    worst = max_weight_difference(model.model_dir, one_host.model_dir)
    assert worst < 1e-5, f"two hosts and one host differ by {worst}"
    trained = loaded.state_dict()
    base = AutoModelForSequenceClassification.from_pretrained(
        cfg.model.name_or_path, num_labels=len(cfg.task.labels)
    ).state_dict()
    learned = max(
        (trained[k] - v).abs().max().item()
        for k, v in base.items()
        if not k.startswith("classifier")
    )
    assert worst < learned / 100, f"noise {worst} against what training changed, {learned}"


def task_runs(flow_run_id: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name: r for r in runs}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("problem", ["wrong port", "refused key", "host missing"])
def test_a_host_problem_fails_the_task_retryably_in_one_line_and_registers_nothing(
    tmp_path, make_config, rows, hosts, problem
):
    from domaintune.flows.retrain import retrain

    where = {
        "wrong port": (
            {"ssh_config": str(hosts.config("wrong-port", ports={"127.0.0.2": free_port()}))},
            "host 127.0.0.2 refused the SSH connection",
        ),
        "refused key": (
            {"ssh_config": str(hosts.config("key", key=make_ssh_key(tmp_path / "other_key")))},
            "host 127.0.0.1 refused the SSH key",
        ),
        "host missing": (
            {"hostfile": str(hosts.hostfile(tmp_path / "one-host", hosts=["127.0.0.1"]))},
            "training.num_nodes is 2 but it lists 1 host(s) (127.0.0.1): 1 host(s) missing",
        ),
    }
    training, message = where[problem]
    cfg = _config(make_config, tmp_path, rows, hosts, retries=1, **training)
    state = retrain(cfg, return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, HostError) and "\n" not in str(exc)
    assert message in str(exc)
    runs = task_runs(str(state.state_details.flow_run_id))
    assert runs["finetune"].state.name == "Failed"
    assert runs["finetune"].run_count == 2, "a host problem is retried"
    assert not (Path(cfg.store.root) / "registry").exists(), "nothing registered"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_killed_remote_rank_ends_the_launch_and_the_prefect_retry_resumes_it(
    tmp_path, make_config, rows, hosts
):
    """The rank on the second host is SIGKILLed mid-training: the whole launch (both
    hosts) ends within seconds, leaving no process behind, and the Prefect retry resumes
    from the newest checkpoint both ranks completed, ending with the weights of a run that
    was never interrupted."""
    from domaintune.flows.retrain import retrain

    training = {"max_steps": 12, "epochs": 10, "checkpoint_every_steps": 2}
    cfg = _config(make_config, tmp_path / "killed", rows, hosts, zero=2, retries=1, **training)
    killed: dict = {}

    def kill_remote_rank() -> None:
        root = Path(cfg.store.root) / "finetune" / ".work"
        deadline = time.time() + 180
        try:
            while not list(root.glob("*/checkpoints/checkpoint-*/.domaintune-complete")):
                assert time.time() < deadline, "no checkpoint was completed"
                time.sleep(0.05)
            spec = next(root.glob("*/spec.json"))
            rank1, env = _rank(spec, 1, deadline)
            first_launch = _launch_processes(spec)
            done = root.glob("*/checkpoints/checkpoint-*/.domaintune-complete")
            killed["completed"] = max(int(p.parent.name.split("-")[1]) for p in done)
            killed["host"] = env["SSH_CONNECTION"].split()[2]
            killed["time"] = time.time()
            rank1.send_signal(signal.SIGKILL)
            # the first launch's processes on both hosts, all gone
            while any(_alive(p) for p in first_launch):
                assert time.time() < killed["time"] + 60, "the launch went on after the kill"
                time.sleep(0.05)
            killed["ended_after"] = time.time() - killed["time"]
        except Exception as exc:
            killed["error"] = exc

    watcher = threading.Thread(target=kill_remote_rank)
    watcher.start()
    summary = retrain(cfg)
    watcher.join()
    assert "error" not in killed, killed.get("error")
    assert killed["host"] == "127.0.0.2"
    assert killed["ended_after"] < 30, f"the launch took {killed['ended_after']:.1f} s to end"

    lineage = json.loads((Path(summary["model_dir"]).parent / "lineage.json").read_text())
    first, second = lineage["model"]["attempts"]
    assert first["exit_code"] != 0 and first["nodes"] == 2 and first["resumed_from"] is None
    resumed = int(second["resumed_from"].split("-")[1])
    assert resumed >= killed["completed"] and second["exit_code"] == 0
    runs = task_runs(summary["run_id"])
    assert runs["finetune"].state.name == "Completed" and runs["finetune"].run_count == 2
    from tests.flows.test_retrain import run_logs

    logs = "\n".join(run_logs(summary["run_id"]))
    assert "the rank on host 127.0.0.2 was killed by SIGKILL" in logs
    trained = json.loads((Path(summary["model_dir"]) / "training_summary.json").read_text())
    assert trained["start_step"] == resumed and trained["global_step"] == 12

    from transformers import AutoModelForSequenceClassification

    clean, _, _ = _train(_config(make_config, tmp_path / "clean", rows, zero=2, **training))
    loaded = AutoModelForSequenceClassification.from_pretrained(summary["model_dir"])
    assert sum(p.numel() for p in loaded.parameters()) == clean.total_parameters
    worst = max_weight_difference(summary["model_dir"], clean.model_dir)
    assert worst < 1e-5, f"the resumed two-host run differs from an uninterrupted one by {worst}"
