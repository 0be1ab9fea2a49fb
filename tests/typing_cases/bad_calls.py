from titan_broker import ProcessManager, cache, process, public, rate_limit
from processes.calculator import Calculator


async def main(pm: ProcessManager) -> None:
    calc = await pm.spawn("processes/calculator.py", Calculator)
    await calc.add("five", 3)  # line 7: wrong argument type
    name: str = await calc.add(5, 3)  # line 8: a float is not a str
    await calc.no_such_method()  # line 9: unknown method
    remote = await pm.connect("calculator", Calculator)
    remote.add(1, 2).upper()  # line 11: a coroutine of float has no upper()


@process(name="typed")
class Typed:
    @cache(ttl=1)
    @public
    @rate_limit(rps=5)
    async def get(self, key: int) -> str:
        return str(key)


async def decorated(pm: ProcessManager) -> None:
    typed = await pm.connect("typed", Typed)
    await typed.get("one")  # line 25: decorators keep the signature
    ok: str = await typed.get(1)
    assert ok


from processes.database import Database


async def users(pm: ProcessManager) -> None:
    db = await pm.connect("database", Database)
    when: str = (await db.get_user(7)).created_at  # line 35: a datetime, not a str
    db.get_user(7).name  # line 36: the name of a User, once awaited


async def jobs(pm: ProcessManager) -> None:
    calc = await pm.spawn("processes/calculator.py", Calculator)
    await pm.submit(calc.add, "x", 3)  # line 41: a job's arguments are checked too
    text: str = await (await pm.submit(calc.add, 1, 2)).result()  # line 42: its result is a float
