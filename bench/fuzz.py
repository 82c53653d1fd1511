"""A long fuzzing campaign over every input reader: the properties of
tests/bad_inputs/test_fuzz.py (a result or a one-line project error, never a traceback; input
files unchanged), each target run on thousands of examples instead of CI's few dozen.

The time (``--minutes``) is shared out evenly among the targets. Each target runs in rounds of
fresh random examples (a new seed each round, no example database), sized to fill its share;
a failure stops that target and is shrunk by Hypothesis to a minimal reproducer. An example
that runs longer than ``--example-timeout`` seconds counts as a failure (a hang: an
exponential YAML alias, a regex that backtracks). Prints, per target: examples run, failures
found (each with its minimal reproducer) and seconds; exits 1 if any target failed.

    python bench/fuzz.py                          # 10 minutes over every target
    python bench/fuzz.py --minutes 3
    python bench/fuzz.py --targets jsonl_read,hostfile --minutes 5 --seed 7
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


class Slow(Exception):
    """An example ran past --example-timeout seconds."""


@dataclasses.dataclass
class Outcome:
    name: str
    examples: int = 0
    seconds: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)
    #: the most common ways the examples ended (a result, or which refusal)
    ends: list[tuple[str, int]] = dataclasses.field(default_factory=list)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 40]}... ({len(text)} characters)"


def _describe(exc: BaseException) -> list[str]:
    """Each distinct failure in ``exc`` (an ExceptionGroup where Hypothesis found several):
    its error and the minimal example Hypothesis shrank it to (the exception's notes)."""
    found = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
    out = []
    for e in found:
        notes = [_clip(n, 1500) for n in getattr(e, "__notes__", []) if n.strip()]
        message = _clip(str(e).strip().replace("\n", " | "), 600)
        out.append(f"{type(e).__name__}: {message}\n      " + "\n      ".join(notes))
    return out


def run_target(target: Any, seconds: float, seed: int, example_timeout: float) -> Outcome:
    from hypothesis import seed as with_seed

    from tests.bad_inputs.test_fuzz import SEEN, property_test

    result = Outcome(target.name)
    SEEN.clear()

    def counted(value: Any) -> None:
        result.examples += 1
        signal.setitimer(signal.ITIMER_REAL, example_timeout)
        try:
            target.check(value)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def on_alarm(signum: int, frame: Any) -> None:
        raise Slow(f"one example ran over {example_timeout:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    counting = dataclasses.replace(target, check=counted)
    start = time.monotonic()
    chunk, rounds = 20, 0
    try:
        while time.monotonic() - start < seconds:
            before, began = result.examples, time.monotonic()
            test = with_seed(seed + rounds)(property_test(counting, chunk, derandomize=False))
            try:
                test()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # the property failed (any exception, shrunk)
                result.failures = _describe(exc)
                break
            rounds += 1
            per_example = (time.monotonic() - began) / max(result.examples - before, 1)
            left = seconds - (time.monotonic() - start)
            chunk = int(min(5000, max(10, left / per_example / 2)))
    finally:
        signal.signal(signal.SIGALRM, previous)
        result.seconds = time.monotonic() - start
        result.ends = SEEN.most_common(5)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="the whole campaign's time")
    parser.add_argument("--targets", default="", help="comma-separated target names (all)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--example-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    import logging

    logging.disable(logging.WARNING)  # the readers log decoded encodings; GX logs its runs
    from tests.bad_inputs.test_fuzz import TARGETS

    chosen = [t for t in TARGETS if not args.targets or t.name in args.targets.split(",")]
    if not chosen:
        parser.error(f"no such target; known: {', '.join(t.name for t in TARGETS)}")
    share = args.minutes * 60 / len(chosen)
    print(f"fuzz: {len(chosen)} target(s), {share:.0f} s each, seed {args.seed}", flush=True)
    outcomes = []
    for target in chosen:
        outcome = run_target(target, share, args.seed, args.example_timeout)
        outcomes.append(outcome)
        status = f"{len(outcome.failures)} failure(s)" if outcome.failures else "0 failures"
        print(
            f"{outcome.name:24s} {outcome.examples:7d} examples  {status:12s} "
            f"{outcome.seconds:6.1f} s",
            flush=True,
        )
        total = sum(n for _, n in outcome.ends) or 1
        ends = "; ".join(f"{100 * n / total:.0f}% {what}" for what, n in outcome.ends)
        print(f"    ends: {ends}", flush=True)
        for failure in outcome.failures:
            print(f"    FAILURE {failure}", flush=True)
    total = sum(o.examples for o in outcomes)
    failed = [o.name for o in outcomes if o.failures]
    print(
        f"fuzz: {total} examples over {len(outcomes)} target(s); "
        + (f"FAILED: {', '.join(failed)}" if failed else "no failures")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
