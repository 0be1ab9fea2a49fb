from titan_broker import ProcessManager
from processes.calculator import Calculator


async def main(pm: ProcessManager) -> None:
    calc = await pm.spawn("processes/calculator.py", Calculator)
    await calc.add("five", 3)  # line 7: wrong argument type
    name: str = await calc.add(5, 3)  # line 8: a float is not a str
    await calc.no_such_method()  # line 9: unknown method
    remote = await pm.connect("calculator", Calculator)
    remote.add(1, 2).upper()  # line 11: a coroutine of float has no upper()
