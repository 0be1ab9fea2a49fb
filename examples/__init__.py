"""Runnable examples; `python -m examples.usage` is the README's demo."""
