"""serve() gives a proxy typed as the service class (checked by tests/test_typing.py)."""

from processes.calculator import Calculator
from titan_broker.testing import Served, serve, served


async def main() -> float:
    async with serve(Calculator) as calc:
        reveal_type(calc)
        total = await calc.add(1, 2)
        reveal_type(total)
        helper = served(calc)
        await helper.join()
    async with serve("processes/calculator.py", Calculator, workers=2) as by_path:
        reveal_type(by_path)
    handle: Served[Calculator] = serve(Calculator)
    async with handle as again:
        await handle.due_now()
        return await again.divide(1, 2) + total


async def wrong() -> None:
    async with serve(Calculator) as calc:
        await calc.add("one", 2)
        await calc.no_such_method()
