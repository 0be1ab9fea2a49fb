from titan_broker import ProcessManager, with_options
from processes.calculator import Calculator


async def main(pm: ProcessManager) -> float:
    calc = await pm.spawn("processes/calculator.py", Calculator)
    total: float = await calc.add(5, 3)
    fast = with_options(calc, timeout=1.0)
    return total + await fast.divide(1, 2)
