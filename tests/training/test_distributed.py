"""Launching at scale: the launch plan (world size, precision, constant global batch,
hostfiles) and real multi-rank DeepSpeed runs on CPU (gloo): ZeRO-2 and ZeRO-3 with two
ranks, the saved model loading in plain transformers, and a killed rank resumed on retry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from domaintune.config import TrainingConfig
from domaintune.errors import ConfigError, HostError, TrainingFailed
from domaintune.storage.store import Store
from domaintune.tasks import finetune as finetune_stage
from domaintune.tasks.ingest import ingest
from domaintune.tasks.preprocess import preprocess
from domaintune.training import supervisor
from domaintune.training.checks import max_weight_difference, saved_tensors, verify_saved_model
from domaintune.training.deepspeed_config import build_deepspeed_config
from domaintune.training.launch import (
    child_env,
    plan_launch,
    read_hostfile,
    write_deepspeed_env,
)
from tests.conftest import write_csv
from tests.services import free_port

# ------------------------------------------------------------------ launch plan (fast)


def _plan(gpus=0, bf16=False, cpu_bf16=(), **training):
    return plan_launch(
        TrainingConfig.model_validate(training),
        gpus=gpus,
        bf16_supported=bf16,
        cpu_bf16=list(cpu_bf16),
    )


def test_cpu_defaults_to_one_rank_on_localhost_in_fp32_without_bf16_hardware():
    plan = _plan()
    assert (plan.world_size, plan.precision, plan.use_gpu) == (1, "fp32", False)
    assert plan.precision_reason == (
        "fp32: this CPU has no bf16 instructions (AMX, AVX512-BF16 or Arm BF16)"
    )
    cmd = plan.command("/x/spec.json")
    # one host: DeepSpeed's per-node launcher, with the world its runner would have given it
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.launch"]
    assert _world_info(cmd) == {"localhost": [0]}
    assert "--master_addr=127.0.0.1" in cmd
    assert "--hostfile" not in cmd
    # a CPU rank learns its allocator from the command line (it restarts itself with it
    # before anything heavy loads); the spec is read once, typed
    assert cmd[-4:] == ["--spec", "/x/spec.json", "--cpu-allocator", "auto"]
    assert plan.command("/x/spec.json", "system")[-1] == "system"


def _world_info(cmd: list[str]) -> dict:
    import base64
    import json

    (arg,) = [a for a in cmd if a.startswith("--world_info=")]
    return json.loads(base64.urlsafe_b64decode(arg.split("=", 1)[1]))


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_global_batch_is_the_same_at_every_world_size(gpus):
    plan = _plan(gpus=gpus, bf16=True, batch_size=4, global_batch_size=32)
    assert plan.global_batch_size == 32 and plan.world_size == gpus
    assert plan.gradient_accumulation_steps == 32 // (4 * gpus)


def test_global_batch_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"global_batch_size 30 is not a multiple of.*4 x 2"):
        _plan(cpu_processes=2, batch_size=4, global_batch_size=30)


def test_without_global_batch_the_accumulation_is_the_configured_one():
    plan = _plan(cpu_processes=2, batch_size=4, gradient_accumulation_steps=3)
    assert plan.gradient_accumulation_steps == 3 and plan.global_batch_size == 24


def test_precision_follows_the_gpu():
    assert _plan(gpus=2, bf16=True).precision == "bf16"
    assert _plan(gpus=2, bf16=False).precision == "fp16"  # e.g. V100, T4
    assert _plan(gpus=0, precision="bf16", cpu_bf16=["avx512_bf16"]).precision == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        _plan(gpus=0, precision="fp16")
    with pytest.raises(ConfigError, match="does not support bf16"):
        _plan(gpus=1, bf16=False, precision="bf16")


def test_on_cpu_auto_picks_bf16_where_the_processor_does_bf16_in_hardware():
    plan = _plan(cpu_bf16=["amx_bf16", "avx512_bf16"])
    assert plan.precision == "bf16" and plan.summary().precision == "bf16"
    assert plan.summary().precision_reason == "bf16 autocast: this CPU has amx_bf16, avx512_bf16"
    assert _plan(cpu_bf16=["avx512_bf16"], precision="fp32").precision == "fp32"
    # bf16 asked for on a CPU without it: emulated (right, only slower), so a warning
    plan = _plan(precision="bf16")
    assert plan.precision == "bf16" and "emulated" in plan.precision_reason
    assert any("no bf16 instructions" in n and "auto picks fp32" in n for n in plan.notes)
    assert not any("bf16" in n for n in _plan(precision="bf16", cpu_bf16=["bf16"]).notes)


def test_bf16_instructions_are_read_from_the_processor_flags():
    from domaintune.training.launch import cpu_bf16_features

    epyc = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire = "flags\t: avx512f amx_tile amx_bf16 avx512_bf16 amx_int8\n"
    graviton3 = "Features\t: fp asimd sve bf16 i8mm\n"
    broadwell = "flags\t: fpu sse2 avx2 fma\n"
    assert cpu_bf16_features(epyc) == ["avx512_bf16"]
    assert cpu_bf16_features(sapphire) == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_features(graviton3) == ["bf16"]
    assert cpu_bf16_features(broadwell) == []
    # this machine: whatever it has, the plan says it and acts on it
    here = cpu_bf16_features()
    plan = plan_launch(TrainingConfig(), gpus=0, bf16_supported=False)
    assert plan.precision == ("bf16" if here else "fp32")
    assert all(f in plan.precision_reason for f in here)


def test_models_are_scored_in_the_precision_they_trained_in():
    from domaintune.loading import autocast_for

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 5))
    x = torch.randn(8, 64)
    with torch.inference_mode():
        with autocast_for(model, "fp32"):
            fp32 = model(x)
        with autocast_for(model, "bf16"):
            bf16 = model(x)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16  # the matmuls ran in bf16
    assert (bf16.float() - fp32).abs().max() < 0.05 and not torch.equal(bf16.float(), fp32)
    assert next(model.parameters()).dtype == torch.float32  # the weights stay as they are


def test_on_cpu_in_bf16_attention_runs_in_fp32_through_the_fused_kernel(tiny_model):
    """PyTorch's fused CPU attention is several times slower in bf16 than in fp32: under
    bf16 autocast on CPU the registered kernel computes attention in fp32 (closer to an
    fp32 model than bf16 SDPA is) and hands bf16 back to the bf16 matmuls around it."""
    from transformers import AutoModelForSequenceClassification

    from domaintune.training.attention import CPU_ATTENTION, attention_implementation

    assert attention_implementation("auto", "bf16", str(tiny_model)) == CPU_ATTENTION
    assert attention_implementation("eager", "bf16", str(tiny_model)) == "eager"

    def model(impl):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(
            str(tiny_model), num_labels=3, attn_implementation=impl,
            attention_probs_dropout_prob=0.0,
        ).eval()  # fmt: skip

    ids = torch.randint(5, 90, (4, 24))
    mask = torch.ones_like(ids)
    mask[:2, 12:] = 0
    with torch.inference_mode():
        exact = model("sdpa")(input_ids=ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = model(CPU_ATTENTION)(input_ids=ids, attention_mask=mask).logits
            plain = model("sdpa")(input_ids=ids, attention_mask=mask).logits
    assert (ours.float() - exact).abs().max() <= (plain.float() - exact).abs().max() + 1e-3
    assert (ours.float() - exact).abs().max() < 0.05
    # the saved model does not name the kernel: it loads anywhere
    saved = model(CPU_ATTENTION)
    assert CPU_ATTENTION not in saved.config.to_json_string()


def test_num_gpus_is_capped_by_what_is_visible():
    plan = _plan(gpus=2, bf16=True, num_gpus=8)
    assert plan.world_size == 2 and any("8 but 2 visible" in n for n in plan.notes)


def test_multi_node_plan_from_a_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the training cluster\nnode-a slots=8\nnode-b slots=8\nnode-c slots=8\n")
    plan = _plan(gpus=8, bf16=True, num_nodes=2, hostfile=str(hostfile), global_batch_size=256,
                 batch_size=8)  # fmt: skip
    assert plan.hosts == [("node-a", 8), ("node-b", 8)] and plan.world_size == 16
    assert plan.gradient_accumulation_steps == 2 and plan.multi_node
    cmd = plan.command("/shared/spec.json")
    assert cmd[-2:] == ["--spec", "/shared/spec.json"]  # GPU ranks: no allocator restart
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile)
    assert cmd[cmd.index("--num_nodes") + 1] == "2"
    assert cmd[cmd.index("--launcher") + 1] == "pdsh"
    assert cmd[cmd.index("--master_addr") + 1] == "node-a"
    assert "--num_gpus" not in cmd  # every slot of each host
    limited = _plan(gpus=8, bf16=True, num_nodes=2, num_gpus=4, hostfile=str(hostfile),
                    master_addr="10.0.0.1", master_port=29600, launcher="slurm")  # fmt: skip
    cmd = limited.command("/s.json")
    assert limited.world_size == 8 and cmd[cmd.index("--num_gpus") + 1] == "4"
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1"
    assert cmd[cmd.index("--master_port") + 1] == "29600"
    assert cmd[cmd.index("--launcher") + 1] == "slurm"


def test_a_hostfile_of_this_host_alone_starts_ranks_directly(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=4\n")
    plan = _plan(cpu_processes=2, hostfile=str(hostfile))
    assert plan.hosts == [("localhost", 2)] and not plan.multi_node
    cmd = plan.command("/s.json")
    assert "--hostfile" not in cmd  # no ssh to localhost
    assert _world_info(cmd) == {"localhost": [0, 1]}


def test_hostfiles_are_read_by_deepspeeds_parser_with_errors_naming_file_and_line(tmp_path):
    """What DeepSpeed's launcher accepts is accepted (``max_slots=``, comments); what it
    rejects is one line naming the file, the line and the rule."""
    ok = tmp_path / "ok"
    ok.write_text("# cluster\nnode-a slots=8 max_slots=8\n\nnode-b   slots=4  # spare\n")
    assert read_hostfile(str(ok)) == [("node-a", 8), ("node-b", 4)]
    cases = {
        "node-a slots=8\nnode-b 8\n": r"hosts, line 2: expected '<host> slots=<n>'.*'node-b 8'",
        "node-a slots=8\n# x\nnode-a slots=2\n": r"hosts, line 3: host 'node-a' is listed twice",
        "node-a slots=8\nnode-b slots=0\n": r"hosts, line 2: host node-b has slots=0",
        "# nothing\n\n": r"hosts: lists no hosts",
    }
    for text, message in cases.items():
        bad = tmp_path / "hosts"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_hostfile(str(bad))
    one = tmp_path / "one"
    one.write_text("node-a slots=8\n")
    # a scheduler writes the hostfile as hosts come up: missing hosts are worth a retry
    with pytest.raises(HostError, match=r"one: training.num_nodes is 2 but it lists 1 host\(s\) "
                       r"\(node-a\): 1 host\(s\) missing"):  # fmt: skip
        _plan(gpus=8, bf16=True, num_nodes=2, hostfile=str(one))
    with pytest.raises(HostError, match="missing: cannot be read"):
        read_hostfile(str(tmp_path / "missing"))


def test_config_rules_for_nodes_and_offload():
    with pytest.raises(ValueError, match="give training.hostfile"):
        TrainingConfig(num_nodes=2)
    with pytest.raises(ValueError, match="offload_parameters needs zero_stage 3"):
        TrainingConfig.model_validate({"deepspeed": {"zero_stage": 2, "offload_parameters": True}})
    ds = TrainingConfig.model_validate(
        {"deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_parameters": True}}
    ).deepspeed
    zero = build_deepspeed_config(ds, bf16=True, fp16=False)["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_other_hosts_get_the_needed_variables_and_no_secrets(tmp_path):
    env = {
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "HF_TOKEN": "hf_secret",
        "AWS_SECRET_ACCESS_KEY": "x",
        "NCCL_DEBUG": "INFO",
        "NCCL_AUTH_TOKEN": "nccl-secret",  # a prefix that is forwarded, a name that is secret
        "TEAM_TAG": "risk",
        "TEAM_SIZE": "4",
        "OTHER": "not asked for",
    }
    text = write_deepspeed_env(tmp_path, env, ["TEAM_*"]).read_text()
    assert "HF_HUB_OFFLINE=1" in text and "DS_ACCELERATOR=cpu" in text
    assert "NCCL_DEBUG=INFO" in text and "TEAM_TAG=risk" in text and "TEAM_SIZE=4" in text
    assert "secret" not in text.lower() and "HF_TOKEN" not in text and "OTHER" not in text
    # the launcher itself gets no secret (DeepSpeed logs and runs MLFLOW* on every host)
    plan = _plan()
    launcher_env = child_env(plan, {**env, "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-123"})
    assert not {"HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} & set(launcher_env)
    with pytest.raises(ValueError, match="HF_TOKEN looks like a secret"):
        TrainingConfig(forward_env=["HF_TOKEN"])
    with pytest.raises(ValueError, match="not an environment variable name"):
        TrainingConfig(forward_env=["A B"])


def test_a_rank_that_went_first_is_named_with_its_last_words():
    """DeepSpeed's launcher lines become words; a rank that aborts without an error line
    (a C assertion, a glibc abort) is still explained by the last thing it printed."""
    line = "[2026-11-24 10:00:00,000] [INFO] [launch.py:319:sigkill_handler] exits with return code = -6"
    assert supervisor.rank_failure(line) == "a rank was killed by SIGABRT"
    assert supervisor.rank_failure("10.0.0.2: " + line.replace("-6", "3")) == (
        "the rank on host 10.0.0.2 exited with code 3"
    )
    assert supervisor.rank_failure(line.replace("-6", "0")) is None
    assert supervisor.rank_failure("exits with return code = -9") is None  # not the launcher
    # the rank killed on the second host went first, whatever order the reports arrive in
    lost = "the rank on host 127.0.0.1 exited with code 1"
    killed = "the rank on host 127.0.0.2 was killed by SIGKILL"
    stopped = "the rank on host 127.0.0.3 was killed by SIGTERM"
    assert supervisor.root_failure([stopped, lost, killed]) == killed
    assert supervisor.root_failure([stopped, lost]) == lost
    assert supervisor.root_failure([]) is None
    tail = [
        'DOMAINTUNE {"event": "log", "step": 3}',
        "10.0.0.2: python: shm.cpp:144: reduce_all_buffers: Assertion `!0' failed.",
        "10.0.0.2: " + line,
        "[2026-11-24 10:00:00,001] [INFO] [launch.py:328:sigkill_handler] Killing subprocess 7",
    ]
    words = supervisor._last_rank_words(tail)
    assert words == "python: shm.cpp:144: reduce_all_buffers: Assertion `!0' failed."


def test_a_rank_killed_by_a_signal_is_named_with_where_it_was(tmp_path):
    """A real faulthandler dump (the worker enables it) is read, not buried in the tail: the
    message keeps the line the rank printed before dying and says which thread died where."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import faulthandler, os, sys, threading\n"
        "faulthandler.enable(all_threads=True)\n"
        "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
        "def end_distributed():\n"
        "    print('terminate called without an active exception', file=sys.stderr, flush=True)\n"
        "    os.abort()\n"
        "end_distributed()\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == -signal.SIGABRT
    lines = ["10.0.0.2: " + ln for ln in run.stderr.splitlines()]  # as pdsh forwards them
    dumps = supervisor.FaultDumps()
    tail = [ln for ln in lines if not dumps.feed(ln)]
    assert tail == ["10.0.0.2: terminate called without an active exception"]
    assert dumps.summary == (
        "Fatal Python error: Aborted, current thread in end_distributed (rank.py:6)"
    )
    assert supervisor._last_rank_words(tail) == "terminate called without an active exception"


def test_a_rank_ends_with_its_exit_code_and_error_printed():
    """The worker skips interpreter teardown (pytorch#190489) but keeps its exit codes: an
    error is printed and exits 1, a bad command line exits 2."""
    worker = [sys.executable, "-m", "domaintune.training.worker"]
    bad_spec = subprocess.run(
        [*worker, "--spec", "/nonexistent/spec.json"], capture_output=True, text=True, timeout=120
    )
    assert bad_spec.returncode == 1
    assert "FileNotFoundError" in bad_spec.stderr and "spec.json" in bad_spec.stderr
    no_spec = subprocess.run(worker, capture_output=True, text=True, timeout=120)
    assert no_spec.returncode == 2 and "--spec" in no_spec.stderr


def test_progress_description_shows_loss_and_throughput():
    text = supervisor.progress_description(
        40, 80, loss=0.53125, tokens_per_second=1234.5, samples_per_second=12.25
    )
    assert text == "Training: step 40 of 80 · loss 0.5312 · 1,234 tokens/s · 12.2 samples/s"


# ------------------------------------------------------------- saved-model check (fast)


def test_a_zero3_save_of_empty_partitions_is_rejected(tmp_path, tiny_model):
    """What an un-gathered ZeRO-3 save looks like: every tensor of shape [0]."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    good = tmp_path / "good"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    model.save_pretrained(good)
    n = sum(p.numel() for p in model.parameters())
    info = verify_saved_model(good, "text_classification", ["a", "b", "c"], expected_parameters=n)
    assert info["parameters"] == n and info["loads_in_transformers"]
    with pytest.raises(TrainingFailed, match="training built"):
        verify_saved_model(good, "text_classification", ["a", "b", "c"], expected_parameters=n + 1)

    empty = tmp_path / "empty"
    model.save_pretrained(empty)
    f = next(empty.glob("*.safetensors"))
    save_file({k: torch.empty(0) for k in load_file(str(f))}, str(f), metadata={"format": "pt"})
    assert all(s == (0,) for s in saved_tensors(empty).values())
    with pytest.raises(TrainingFailed, match=r"saved empty.*ZeRO-3 partitions were not gathered"):
        verify_saved_model(empty, "text_classification", ["a", "b", "c"], expected_parameters=n)

    partial = tmp_path / "partial"  # one rank's shard only: a weight is missing
    model.save_pretrained(partial)
    f = next(partial.glob("*.safetensors"))
    state = load_file(str(f))
    state.pop("classifier.weight")
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(TrainingFailed, match="classifier.weight is not in the saved files"):
        verify_saved_model(partial, "text_classification", ["a", "b", "c"], expected_parameters=n)


# --------------------------------------------------------- real two-rank launches (slow)


def _two_rank_config(make_config, tmp_path, rows, zero, **training):
    src = write_csv(tmp_path / "d.csv", rows(16))
    return make_config(
        src,
        training={
            "cpu_processes": 2,
            "batch_size": 4,
            "global_batch_size": 16,  # 4 per rank x 2 ranks x 2 accumulation
            "max_steps": 4,
            "epochs": 1,
            "learning_rate": 5e-3,
            "deepspeed": {"zero_stage": zero},
            **training,
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_cpu_ranks_train_and_save_a_model_plain_transformers_loads(
    tmp_path, make_config, rows, zero
):
    from transformers import AutoModelForSequenceClassification

    extra: dict = {"attention": "eager"}
    if zero == 3:  # the hostfile route of the launcher, on this one host
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=2\n")
        extra = {"hostfile": str(hostfile), "gradient_checkpointing": True}
    # rank 0's port names this launch's shared-memory buffers (other tests may be launching
    # at the same time)
    port = free_port()
    cfg = _two_rank_config(make_config, tmp_path, rows, zero, master_port=port, **extra)
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    model = finetune_stage.finetune(cfg, splits, store)
    # DeepSpeed's CPU all-reduce buffers (66 MB a rank) do not outlive the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))

    assert model.launch.world_size == 2 and model.launch.gradient_accumulation_steps == 2
    assert model.launch.global_batch_size == 16 and model.launch.zero_stage == zero
    assert model.attempts[-1]["processes"] == 2 and model.global_step == 4
    summary = json.loads((Path(model.model_dir) / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_samples"] == 64
    assert summary["gradient_checkpointing"] == (zero == 3)
    if zero == 2:
        assert summary["attention"] == "eager"
    assert summary["train_tokens_per_second"] > 0 and summary["train_tokens"] > 64
    log = (Path(model.model_dir) / "train.log").read_text()
    assert "dist_world_size=2" in log  # the DeepSpeed launcher started both ranks

    loaded = AutoModelForSequenceClassification.from_pretrained(model.model_dir)
    assert sum(p.numel() for p in loaded.parameters()) == model.total_parameters
    assert model.saved_model.parameters == model.total_parameters
    base = AutoModelForSequenceClassification.from_pretrained(cfg.model.name_or_path, num_labels=3)
    changed = [
        k
        for k, v in loaded.state_dict().items()
        if k in base.state_dict() and not k.startswith("classifier")
        and not torch.equal(v, base.state_dict()[k])
    ]  # fmt: skip
    assert changed, "the encoder's weights did not change (an empty or base-only save)"


@pytest.mark.slow
def test_a_killed_rank_is_resumed_from_its_checkpoint_on_retry(tmp_path, make_config, rows):
    """Rank 1 is SIGKILLed right after checkpoint 2; the launcher ends rank 0; the retry
    resumes at step 2 with optimizer, scheduler, RNG and data position restored, and ends
    with the same weights as a run that was never interrupted."""
    training = {"max_steps": 6, "checkpoint_every_steps": 2, "early_stopping_patience": 3}
    cfg = _two_rank_config(make_config, tmp_path / "killed", rows, 2, **training)
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)

    os.environ["DOMAINTUNE_FAULT_EXIT_AFTER_STEP"] = "2"
    os.environ["DOMAINTUNE_FAULT_KILL_RANK"] = "1"
    try:
        with pytest.raises(TrainingFailed, match="training exited with code"):
            finetune_stage.finetune(cfg, splits, store)
    finally:
        del os.environ["DOMAINTUNE_FAULT_EXIT_AFTER_STEP"], os.environ["DOMAINTUNE_FAULT_KILL_RANK"]
    resumed = finetune_stage.finetune(cfg, splits, store)  # what the task's retry runs
    first, second = resumed.attempts
    assert first["exit_code"] != 0 and first["resumed_from"] is None
    assert second["resumed_from"] == "checkpoint-2" and second["processes"] == 2
    summary = json.loads((Path(resumed.model_dir) / "training_summary.json").read_text())
    assert summary["start_step"] == 2 and summary["global_step"] == 6
    assert summary["trained_steps"] == 4  # the work lost: nothing past the checkpoint

    clean_cfg = _two_rank_config(make_config, tmp_path / "clean", rows, 2, **training)
    clean_store = Store(clean_cfg.store.root)
    clean_splits = preprocess(clean_cfg, ingest(clean_cfg, clean_store), clean_store)
    clean = finetune_stage.finetune(clean_cfg, clean_splits, clean_store)
    worst = max_weight_difference(resumed.model_dir, clean.model_dir)
    assert worst < 1e-5, f"resumed run differs from an uninterrupted one by {worst}"


_TASK_SCRIPT = """
import json, sys
from domaintune.runconfig import validate_config
from domaintune.storage.manifests import SplitManifest
from domaintune.storage.store import Store
from domaintune.tasks.finetune import finetune
cfg = validate_config(json.loads(open(sys.argv[1]).read()))
splits = SplitManifest.model_validate_json(open(sys.argv[2]).read())
finetune(cfg, splits, Store(cfg.store.root))
"""


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_a_killed_task_process_takes_its_ranks_along_and_the_retry_resumes(
    tmp_path, make_config, rows
):
    """The process running the finetune task is SIGKILLed mid-training (a lost worker):
    its two ranks end themselves instead of training on as orphans into the checkpoint
    folder, and the retried task resumes from the newest complete checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    cfg = _two_rank_config(make_config, tmp_path, rows, 2, max_steps=40, checkpoint_every_steps=2)
    store = Store(cfg.store.root)
    splits = preprocess(cfg, ingest(cfg, store), store)
    key, _, _ = finetune_stage.plan(cfg, splits)
    work = store.scratch_dir("finetune", key)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    (tmp_path / "splits.json").write_text(splits.model_dump_json())
    task = subprocess.Popen(
        [sys.executable, "-c", _TASK_SCRIPT, str(tmp_path / "cfg.json"), str(tmp_path / "splits.json")]
    )  # fmt: skip
    deadline = time.time() + 180
    while not list((work / "checkpoints").glob("checkpoint-*/.domaintune-complete")):
        assert task.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    assert _processes_mentioning(str(work / "spec.json")), "the ranks should be running"
    task.send_signal(signal.SIGKILL)
    task.wait()
    deadline = time.time() + 30
    while _processes_mentioning(str(work / "spec.json")):
        assert time.time() < deadline, "orphaned ranks kept running after the task was killed"
        time.sleep(0.5)

    model = finetune_stage.finetune(cfg, splits, store)  # the retry
    resumed = model.attempts[-1]["resumed_from"]
    assert resumed is not None and int(resumed.split("-")[1]) >= 2
    summary = json.loads((Path(model.model_dir) / "training_summary.json").read_text())
    assert summary["start_step"] == int(resumed.split("-")[1]) and model.global_step == 40
