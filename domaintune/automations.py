"""Prefect automations that make a lost worker cost one checkpoint interval, not a retrain.

When a worker host dies (SIGKILL, a lost VM, an evicted pod), its flow run stays *Running* in
the Prefect server: nothing in the run is left to report otherwise. Two automations, created
by ``domaintune serve`` (or ``python -m domaintune.automations``) on the server:

1. **Crash silent runs**: every flow run of a deployment emits a heartbeat event every
   ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (``domaintune serve`` sets 30 for its
   workers). A run tagged ``retrain`` that has sent no heartbeat for ``crash_after`` seconds,
   and has not finished, is marked **Crashed** (Prefect's documented zombie-flow recipe).
2. **Retry crashed retrains**: a run tagged ``retrain`` that crashed is put back to
   **Scheduled** (named ``AwaitingRetry``), the same flow run with the same parameters, so any
   worker of the pool picks it up; at most ``retries`` times (matched on the run count, so a
   run that crashes every time is not retried forever). The retried run reuses every stage in
   the store, waits for the dead holder's lease to expire and resumes training from the last
   checkpoint in the store.

The deployments' concurrency limit (one run per deployment, queued) still holds across the
retry: the crashed run's slot is released when it is marked Crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import timedelta

CRASH = "domaintune: crash silent retrain runs"
RETRY = "domaintune: retry crashed retrain runs"
TAG = "retrain"
#: a heartbeat every this many seconds from workers started by domaintune serve
HEARTBEAT_SECONDS = 30


def automations(crash_after: float, retries: int) -> list:
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    tagged = {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"}
    crash = Automation(
        name=CRASH,
        description=f"A {TAG} flow run without a heartbeat for {crash_after:.0f} s lost its "
        "worker: mark it Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Superseded",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=tagged,
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crash_after),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {crash_after:.0f} s: its worker or host was lost",
            )
        ],
    )
    retry = Automation(
        name=RETRY,
        description=f"A crashed {TAG} flow run is scheduled again (at most {retries} times) "
        "for any worker of its pool; it resumes from the store.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match={
                "prefect.resource.id": "prefect.flow-run.*",
                # the run count of the attempt that crashed: 1 .. retries are retried
                "prefect.run-count": [str(i) for i in range(0, retries + 1)],
            },
            match_related=tagged,
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED,
                name="AwaitingRetry",
                message="crashed (its worker or host was lost): retried on any worker of the "
                "pool; stages come from the store and training resumes from its last checkpoint",
                force=True,
            )
        ],
    )
    return [crash, retry]


async def ensure(crash_after: float, retries: int) -> list[str]:
    """Create the automations on the server of ``PREFECT_API_URL``, replacing older ones of
    the same names. Returns their ids."""
    from prefect.client.orchestration import get_client

    wanted = automations(crash_after, retries)
    ids = []
    async with get_client() as client:
        for a in wanted:
            for old in await client.read_automations_by_name(a.name):
                await client.delete_automation(old.id)
            created = await a.acreate()
            ids.append(str(created.id))
    return ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m domaintune.automations")
    p.add_argument("--crash-after", type=float, default=3 * HEARTBEAT_SECONDS)
    p.add_argument("--retries", type=int, default=2)
    args = p.parse_args(argv)
    ids = asyncio.run(ensure(args.crash_after, args.retries))
    print(" ".join(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
