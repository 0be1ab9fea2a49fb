"""The checker can fail: run the nemesis against a mutant of tests/mutation_check.py.

``python -m tests.nemesis.mutants --mutant no-ownership-check --seed 5 --minutes 1``: copies the
repository to a scratch folder, applies the mutation's edits there (never to the checkout), runs
``python -m tests.nemesis`` from the copy (its workers and callers import the copy's code), and
prints the checker's verdict. Exit 0 when the checker caught the mutant (a violation), 1 when the
mutant survived, 2 when the mutation is unknown or no longer applies.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from tests import mutation_check as mc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nemesis.mutants", description=__doc__)
    parser.add_argument("--mutant", required=True, help="a mutation of tests/mutation_check.py")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--topology", choices=("single", "cluster"), default="single")
    args = parser.parse_args(argv)
    mutation = next((m for m in mc.MUTATIONS if m.name == args.mutant), None)
    if mutation is None:
        print(f"no mutation {args.mutant!r}: {', '.join(m.name for m in mc.MUTATIONS)}")
        return 2
    with tempfile.TemporaryDirectory(prefix="nemesis-mutant-") as scratch:
        copy = Path(scratch) / "repo"
        mc.copy_tree(mc.ROOT, copy)
        try:
            mc.apply(copy, mutation.edits)
        except mc.BadMutation as exc:
            print(f"{args.mutant} no longer applies: {exc}")
            return 2
        mc.canary(copy)
        folder = Path(scratch) / "history"
        command = [sys.executable, "-m", "tests.nemesis", "--minutes", str(args.minutes), "--seed",
                   str(args.seed), "--topology", args.topology, "--folder", str(folder)]  # fmt: skip
        done = subprocess.run(command, cwd=copy, env=mc.environment(copy), capture_output=True, text=True)
        summary = done.stdout[done.stdout.find("calls, ") - 12 :] if "calls, " in done.stdout else done.stdout
        print(f"mutant {args.mutant}, seed {args.seed}, {args.topology}, {args.minutes:g} min:")
        print(summary.strip()[-4000:])
        if done.returncode not in (0, 1):
            print(done.stderr[-3000:])
            return 2
        caught = done.returncode == 1
        print("CAUGHT" if caught else "SURVIVED")
        return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main())
