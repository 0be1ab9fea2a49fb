"""``python -m tests.nemesis --minutes M --seed N --topology single|cluster|sentinel [--folder DIR]``.

Runs the nemesis, prints the checker's summary, exits 1 when an invariant broke. ``--check DIR``
only checks the history of an earlier run.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

from . import checker
from .run import RunConfig, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nemesis", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    parser.add_argument("--topology", choices=("single", "cluster", "sentinel"), default="single")
    parser.add_argument("--folder", type=Path, default=None, help="where the history goes")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--callers", type=int, default=3)
    parser.add_argument("--check", type=Path, default=None, help="only check this run's history")
    args = parser.parse_args(argv)
    if args.check is not None:
        return checker.main(str(args.check))
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    folder = args.folder or Path(tempfile.mkdtemp(prefix=f"nemesis-{args.topology}-{seed}-"))
    print(f"nemesis: {args.topology}, seed {seed}, {args.minutes:g} min; history in {folder}", flush=True)
    verdict = run(RunConfig(seconds=args.minutes * 60, seed=seed, topology=args.topology, folder=folder,
                            workers=args.workers, callers=args.callers))  # fmt: skip
    print(verdict.summary())
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
