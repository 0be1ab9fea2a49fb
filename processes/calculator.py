"""A calculator service: arithmetic, errors that cross the wire, stats and a health check."""

from __future__ import annotations

import math
from typing import Any

from titan_broker import Health, health_check, on_shutdown, process, public


@process(name="calculator", version="1.0.0")
class Calculator:
    """Basic and advanced arithmetic with operation statistics."""

    async def init(self, precision: int = 10) -> None:
        self.precision = precision
        self.operations = 0
        self.last_operation: str | None = None
        self.closed = False

    def _record(self, op: str, result: float) -> float:
        self.operations += 1
        self.last_operation = op
        return round(result, self.precision)

    @public
    async def add(self, a: float, b: float) -> float:
        return self._record("add", a + b)

    @public
    async def subtract(self, a: float, b: float) -> float:
        return self._record("subtract", a - b)

    @public
    async def multiply(self, a: float, b: float) -> float:
        return self._record("multiply", a * b)

    @public
    async def divide(self, a: float, b: float) -> float:
        if b == 0:
            raise ValueError("Division by zero")
        return self._record("divide", a / b)

    @public
    async def power(self, base: float, exponent: float) -> float:
        return self._record("power", math.pow(base, exponent))

    @public
    async def factorial(self, n: int) -> int:
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"factorial needs an integer, got {type(n).__name__}")
        if n < 0:
            raise ValueError("Factorial is not defined for negative numbers")
        if n > 1000:
            raise ValueError("Factorial input too large (max 1000)")
        self.operations += 1
        self.last_operation = "factorial"
        return math.factorial(n)

    @public
    async def get_stats(self) -> dict[str, Any]:
        return {"operation_count": self.operations, "last_operation": self.last_operation}

    @health_check
    async def health(self) -> Health:
        return Health(
            "healthy", checks={"operations": self.operations}, details={"precision": self.precision}
        )

    @on_shutdown
    async def close(self) -> None:
        self.closed = True
