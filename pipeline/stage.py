"""What every DVC stage entry point shares: its command line, interrupts, and the files it writes.

    python -m pipeline.<stage> --params params.yaml [--set section.key=value ...]

A bad configuration or missing input exits 2 with one line naming the stage; Ctrl-C, or the
SIGTERM that stops a killed ``dvc repro``, exits 130 after the stage's own clean-up ran, so the
same command can be run again (the search resumes, the other stages are idempotent).
"""

from __future__ import annotations

import argparse
import csv
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from drtune.config import ConfigError
from pipeline.config import load

STAGE_ERRORS = (ConfigError, FileNotFoundError, RuntimeError)


def _terminate_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stage_main(
    name: str,
    doc: str | None,
    argv: list[str] | None,
    run: Callable[..., dict],
    summary: Callable[[dict], str],
    errors: tuple[type[Exception], ...] = STAGE_ERRORS,
    flags: dict[str, str] | None = None,
) -> int:
    """Parse ``--params``/``--set`` and the stage's own boolean ``flags`` (name → help), load and validate
    the configuration, call ``run(config, **flags)``, print ``summary(result)``; ``errors`` are the
    stage's expected failures (a bad configuration among them), reported in one line."""
    parser = argparse.ArgumentParser(
        prog=f"python -m pipeline.{name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    for flag, text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=text)
    args = parser.parse_args(argv)
    chosen = {
        flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_")) for flag in flags or {}
    }
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        result = run(load(args.params, args.set), **chosen)
    except errors as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"{name}: {err or 'interrupted'}; run it again to resume", file=sys.stderr)
        return 130
    print(summary(result))
    return 0


def flat(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: nested params as MLflow param names."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of equal keys as a CSV file with a header (what DVC plots read)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
