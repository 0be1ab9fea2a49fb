"""A nemesis run with a checker: a mixed workload under random faults, a history, and invariants.

``python -m tests.nemesis --minutes 30 --seed N --topology single|cluster`` runs the long form;
tests/test_nemesis.py runs a short one (a fixed seed, about 90 s per topology). See
docs/reliability.md ("The nemesis run").
"""
