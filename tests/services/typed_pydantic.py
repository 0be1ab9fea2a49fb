"""A test service whose methods take and return pydantic models (pydantic is a test dependency only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from pydantic import BaseModel, Field

from titan_broker import process, public


class Entry(BaseModel):
    at: datetime
    amount: Decimal


class Account(BaseModel):
    id: UUID
    owner: str = Field(min_length=1)
    entries: list[Entry] = []


@process(name="accounts", version="1.0.0")
class Accounts:
    @public
    async def open(self, account: Account, first: Entry | None = None) -> Account:
        if first is not None:
            account.entries.append(first)
        return account

    @public
    async def entries(self, account: Account) -> AsyncIterator[Entry]:
        for entry in account.entries:
            yield entry

    @public
    async def kinds(self, accounts: list[Account]) -> list[str]:
        return [
            f"{type(a).__name__}:{type(a.id).__name__}:{type(a.entries[0].at).__name__}" for a in accounts
        ]

    @public
    async def broken(self) -> Account:
        return {"id": "not a uuid", "owner": ""}  # type: ignore[return-value]  # the error under test
