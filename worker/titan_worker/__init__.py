"""The titan-worker command and the worker runtime that serves a service's stream."""

from .runtime import Worker as Worker

__all__ = ("Worker",)
