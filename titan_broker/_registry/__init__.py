"""Internal: what a namespace holds, read from Redis by anyone (callers, the CLI, a dashboard). Workers and
services (``records``), health (``health``), dead letters (``dead_letters``) and the latency histogram
the workers publish (``latency``)."""
