"""Internal: the wire format, with no I/O. msgpack as the protocol speaks it (``codec``), requests,
replies and stream items (``protocol``), values decoded into their annotations and checked (``values``),
and every Redis key name (``keys``). PROTOCOL.md is its specification."""
