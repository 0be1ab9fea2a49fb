"""The titan-worker command and the worker runtime that serves a service's stream."""

from .worker import Worker as Worker

__all__ = ("Worker",)
