"""Object-store fault drill (issue 33, part 3): rounds of random faults injected between
domaintune and an S3 API server (moto on 127.0.0.1) by the loopback proxy of
``tests/faultproxy.py``, over the three kinds of writes that must survive them:

- entry writes (``Store.compute_once`` + ``Store.writer``: files, then the marker), while a
  reader on "another host" (a direct connection) reads the entry again and again;
- registrations (claim, version folder, ``registration.json``, the register event), checked
  afterwards by a reader on another host: every version the log names is whole, numbered in
  order without a gap or a duplicate;
- lease handovers: a holder behind the proxy releases under faults and a waiter (direct)
  takes the lease; or the holder is cut off from the store (every connection refused) and
  must give the lease up before the waiter takes it over.

Faults per round, at random: bursts of ``503 SlowDown`` or ``500 InternalError``, connections
cut mid-upload, answers lost after the server wrote, slow answers, the store refusing every
connection for 0.5-4 s; one round in eight gets faults that outlast the client's retries:
the operation must then fail with one line and leave nothing half-written, and is tried
once more. Retries are counted from the debug logs of botocore's retry handler and of s3fs
(aiohttp's own single resend of a request on a reused connection is not logged, so not
counted).

    python bench/store_faults.py --rounds 30
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TTL = 2.0  # lease TTL of the drill (DOMAINTUNE_LEASE_TTL for the stores' own locks too)


def _faults(rng: random.Random, proxy, outlast: bool, refuse: bool = True) -> list[str]:
    """Arm a random mix of faults on the proxy; returns what was armed."""
    if outlast:  # 500s: botocore's 5 attempts, then the error (as many 503s take ~40 s:
        proxy.fail_next(12, 500)  # s3fs retries SlowDown 5 times over botocore's 5)
        return ["outlasting 500s"]
    armed = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(("503", "500", "drop", "lose", "slow", "refuse")[: 6 if refuse else 5])
        if kind in ("503", "500"):
            proxy.fail_next(rng.randint(1, 2), int(kind))
        elif kind == "drop":
            proxy.drop_next(rng.randint(1, 2), after_bytes=rng.randint(200, 20_000))
        elif kind == "lose":
            proxy.lose_answers(rng.randint(1, 2))
        elif kind == "slow":
            proxy.slow(rng.uniform(0.002, 0.02))
        elif kind == "refuse":
            proxy.refuse()
            threading.Timer(rng.uniform(0.5, 2.0), proxy.resume).start()
        armed.append(kind)
    return armed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="store-faults-"))
    os.environ["DOMAINTUNE_CACHE"] = str(work / "cache")
    os.environ["DOMAINTUNE_LEASE_TTL"] = str(TTL)
    import logging

    logging.basicConfig(level=logging.ERROR)
    for handler in logging.getLogger().handlers:  # the retry counter turns debug logs on
        handler.setLevel(logging.ERROR)

    from domaintune.errors import StoreError
    from domaintune.registry import Registry
    from domaintune.storage.coordination import Lease, LeaseLost
    from domaintune.storage.remote import S3_RETRIES, describe_remote_error
    from domaintune.storage.store import Store
    from tests.faultproxy import RetryCounter, fault_proxy
    from tests.services import s3_server
    from tests.test_store_faults import (
        Entry,
        Reader,
        _files,
        _write,
        entry_state,
        register_version,
        registry_problems,
    )

    rng = random.Random(args.seed)
    done: Counter[str] = Counter()
    tried: Counter[str] = Counter()
    failed_lines: list[str] = []
    problems: list[str] = []
    partial_reads = half_registered = outlasting = recovered = 0
    handovers: Counter[str] = Counter()
    armed_kinds: Counter[str] = Counter()
    t_start = time.monotonic()
    with s3_server(work / "moto") as s3, fault_proxy(s3.endpoint) as proxy, RetryCounter() as rc:
        import s3fs

        def options(endpoint: str) -> dict:
            return {
                "endpoint_url": endpoint,
                "key": s3.key,
                "secret": s3.secret,
                "skip_instance_cache": True,
            }

        root = f"s3://{s3.bucket('drill')}/store"
        writer = Store(root, options(proxy.endpoint))  # the client behind the proxy
        direct_fs = s3.fs()  # another host's reader
        registry = Registry(writer, "drill")
        reg_path = f"{writer._remote_root}/registry/drill"
        holder_fs = s3fs.S3FileSystem(
            **options(proxy.endpoint),
            use_listings_cache=False,
            config_kwargs={"retries": S3_RETRIES},
        )

        def attempt(op: str, run, outlast: bool) -> bool:
            """Run ``op`` under the armed faults. Where they outlast the client's retries
            (armed so, or by chance: two bursts on one request), the error must be one
            line and leave nothing half-written; the store is then let be and the
            operation tried once more, which must complete."""
            nonlocal outlasting, recovered
            outlasting += outlast
            tried[op] += 1
            for last in (False, True):
                try:
                    run()
                    done[op] += 1
                    recovered += last
                    return True
                except Exception as exc:  # noqa: BLE001 - every failure is judged below
                    line = str(exc)
                    if not isinstance(exc, StoreError | LeaseLost) or "\n" in line:
                        problems.append(f"{op}: not a one-line StoreError: {exc!r}")
                    failed_lines.append(line)
                    if last:
                        problems.append(f"{op}: failed again with the store back: {line}")
                        return False
                    time.sleep(2.5)  # a refusal window ends; a lease left behind expires
                    proxy.passing()
            return False

        for i in range(args.rounds):
            op = ("entry", "registry", "lease")[i % 3]
            outlast = rng.random() < 0.125 and op != "lease"
            proxy.passing()
            cut = op == "lease" and rng.random() < 0.5
            armed = _faults(rng, proxy, outlast, refuse=not cut)  # a cut is a refusal
            armed_kinds.update(set(armed))
            t0 = time.monotonic()
            if op == "entry":
                key = f"k{i}"
                files = _files(f"r{i}", n=rng.randint(1, 4), size=rng.randint(1_000, 200_000))
                remote = f"{writer._remote_root}/prep/{key}"

                def run(key=key, files=files) -> None:
                    writer.compute_once(
                        "prep", key, Entry, lambda: _write(writer, "prep", key, files)
                    )

                with Reader(direct_fs, remote, files) as reader:
                    attempt(op, run, outlast)
                partial_reads += reader.seen.get("partial", 0)
                final = entry_state(direct_fs, remote, files)
                if final == "partial":
                    partial_reads += 1
                    problems.append(f"round {i}: entry {key} left partial")
            elif op == "registry":
                attempt(op, lambda i=i: register_version(registry, f"r{i}"), outlast)
                proxy.passing()
                found = registry_problems(direct_fs, reg_path)
                half_registered += sum("half there" in p for p in found)
                problems += [f"round {i}: {p}" for p in found]
            else:
                folder = f"{writer._remote_root}/locks/drill-{i}"
                holder = Lease(holder_fs, folder, f"holder {i}", ttl=TTL)

                def take(holder: Lease = holder, folder: str = folder) -> None:
                    if holder.generation is None:
                        try:
                            holder.acquire(timeout=30)
                        except Exception as exc:  # as domaintune's lease() says it
                            raise describe_remote_error(exc, f"taking {folder}") from exc

                attempt(op, take, False)
                waiter = Lease(direct_fs, folder, f"waiter {i}", ttl=TTL)
                if holder.generation is None:
                    pass  # not taken even with the store back: counted as a problem
                elif cut:  # cut off: it must give up before the waiter takes over
                    proxy.refuse()
                    t_cut = time.monotonic()
                    waiter.acquire(timeout=10 * TTL)
                    taken = time.monotonic()
                    lost_first = holder.lost or holder._expired()
                    if not lost_first:
                        problems.append(f"round {i}: the holder still believed it held")
                    if taken - t_cut < 0.9 * TTL:
                        problems.append(f"round {i}: taken over after {taken - t_cut:.1f} s")
                    proxy.resume()
                    handovers["cut off, given up first"] += lost_first
                    waiter.release()
                else:  # handed over: released under the faults, taken by the waiter
                    time.sleep(0.3)
                    holder.release()
                    t0_wait = time.monotonic()
                    waiter.acquire(timeout=10 * TTL)
                    released = time.monotonic() - t0_wait < TTL
                    handovers["released, taken at once" if released else "taken after TTL"] += 1
                    waiter.release()
                holder.release()
                armed.append("cut off" if cut else "handover")
            print(
                f"round {i:3d} {op:8s} {'+'.join(armed):28s} {time.monotonic() - t0:5.1f} s",
                flush=True,
            )
        proxy.passing()
        counts = dict(proxy.counts)

    injected = {k: v for k, v in counts.items() if k != "requests" and k != "unparsed"}
    print()
    print(f"rounds                     {args.rounds} in {time.monotonic() - t_start:.0f} s")
    print(f"faults injected            {sum(injected.values())}  {injected}")
    print(
        f"rounds with each fault     {dict(armed_kinds)} (slow: 2-20 ms per chunk; refuse: "
        "0.5-2 s; cut off: refused until the waiter took over)"
    )
    print(f"requests forwarded         {counts.get('requests', 0)}")
    print(
        "operations completed       "
        + ", ".join(f"{op} {done[op]}/{tried[op]}" for op in ("entry", "registry", "lease"))
    )
    print(
        f"retries taken              {rc.total} (botocore {rc.botocore}, s3fs {rc.s3fs}; "
        "aiohttp's resends not logged)"
    )
    one_line = all("\n" not in x for x in failed_lines)
    print(
        f"failed after retries       {len(failed_lines)} (each one line: {one_line}); "
        f"armed to outlast {outlasting}; completed on the next try {recovered}"
    )
    for line in sorted(set(x.split(": ", 2)[-1][:90] for x in failed_lines))[:5]:
        print(f"    e.g. ...{line}")
    print(f"lease handovers            {dict(handovers)}")
    print(f"partial objects read       {partial_reads}")
    print(f"half-registered versions   {half_registered}")
    print(f"problems                   {len(problems)}")
    for p in problems[:20]:
        print(f"    {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
