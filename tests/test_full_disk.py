"""A full disk under a run (issue 33, point 4): a store on a small tmpfs fills up while the
run writes. The run fails with one line naming the folder and what was being written; the
store is still consistent (nothing half-written looks complete, no temporary folder is left
behind); once there is room, the same run succeeds and reuses what had finished, with
nothing cleaned by hand."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import write_csv

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _grow(mnt: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def _complete_entries(store: Path) -> dict[str, str]:
    """stage/key -> creation time of every entry the store calls complete; each is checked
    to hold every file its marker names, at the size it names."""
    out = {}
    for marker in store.glob("*/*/_COMPLETE.json"):
        entry = marker.parent
        doc = json.loads(marker.read_text())
        out[f"{entry.parent.name}/{entry.name}"] = doc["created_at"]
        for rel, size in doc["files"].items():
            assert (entry / rel).stat().st_size == size, f"{entry}: {rel} is not as marked"
    return out


def test_a_full_store_fails_in_one_line_stays_consistent_and_the_next_run_succeeds(
    tmp_path, small_disk, make_config, rows
):
    from domaintune.flows.retrain import retrain

    src = write_csv(tmp_path / "d.csv", rows(30))
    config = make_config(src, store={"root": str(small_disk / "store")})

    state = retrain(config, return_state=True)
    assert not state.is_completed()
    exc = state.result(raise_on_failure=False)
    message = str(exc)
    assert "\n" not in message.strip(), message
    assert "no space left on device" in message, message
    assert str(small_disk) in message, message
    print(f"full disk: {message}")
    store = small_disk / "store"
    assert not list(store.rglob(".tmp-*")), "a temporary folder was left behind"
    before = _complete_entries(store)
    assert not (store / "registry").exists() or not list(
        (store / "registry").rglob("registration.json")
    ), "nothing may be registered by a failed run"

    _grow(small_disk, "64m")
    state = retrain(config, return_state=True)
    assert state.is_completed(), state.result(raise_on_failure=False)
    summary = state.result()
    after = _complete_entries(store)
    assert before.items() <= after.items(), "finished entries are kept, not recomputed"
    cached = {s["name"] for s in summary["stages"] if s["cached"]}
    assert {k.split("/")[0] for k in before} <= cached, (before, cached)
    assert summary["promoted"]
