from datetime import datetime

from processes.calculator import Calculator
from processes.database import Database, User
from titan_broker import ProcessManager, with_options


async def main(pm: ProcessManager) -> float:
    calc = await pm.spawn("processes/calculator.py", Calculator)
    total: float = await calc.add(5, 3)
    fast = with_options(calc, timeout=1.0)
    return total + await fast.divide(1, 2)


async def users(pm: ProcessManager) -> datetime:
    db = await pm.connect("database", Database)
    user = await db.get_user(7)
    reveal_type(user)
    reveal_type(user.created_at)
    same: User = await db.create_user("Ada", "ada@example.org")
    async for streamed in db.users_since(same.created_at):
        reveal_type(streamed)
    reveal_type(await db.search_users("ada"))
    return user.created_at


async def jobs(pm: ProcessManager) -> float:
    calc = await pm.spawn("processes/calculator.py", Calculator)
    job = await pm.submit(calc.add, 5, 3)
    reveal_type(job)
    later = await pm.submit(with_options(calc, delay=10).multiply, 2, 4)
    found = pm.job(job.id, float)
    reveal_type(await found.result(timeout=10))
    return await job.result() + await later.result()
