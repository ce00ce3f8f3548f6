"""One insert, update or delete on the writer's tables, through a cursor the caller commits."""

import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from writer.rows import STATUSES, RowMaker

PERSON_UPDATES = ("balance", "active", "tags", "email", "address")


@dataclass
class Workload:
    """Chooses rows at random and changes them; `counts` says what was done, per kind and table."""

    cur: Cursor
    rows: RowMaker
    rng: random.Random
    schema: str = "public"
    key_change_ratio: float = 0.0
    big_ratio: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.person = sql.Identifier(self.schema, "person")
        self.orders = sql.Identifier(self.schema, "orders")
        self._id_range: tuple[int, int] | None = None
        self._since_range = 0

    def run(self, kind: str) -> None:
        """Do one operation of `kind`; an update or delete with no row at all becomes an insert."""
        if kind == "insert":
            self.insert()
        elif kind == "update":
            self.update()
        else:
            self.delete()

    # --- choosing rows ----------------------------------------------------------------------

    def _person_range(self) -> tuple[int, int] | None:
        self._since_range += 1
        if self._id_range is None or self._since_range > 50:
            self.cur.execute(sql.SQL("SELECT min(id), max(id) FROM {}").format(self.person))
            low, high = self.cur.fetchone() or (None, None)
            self._id_range = None if low is None else (low, high)
            self._since_range = 0
        return self._id_range

    def random_person(self) -> int | None:
        bounds = self._person_range()
        if bounds is None:
            return None
        found = self._first_id_from(self.person, self.rng.randint(*bounds))
        return None if found is None else int(found)

    def random_order(self) -> uuid.UUID | None:
        found = self._first_id_from(self.orders, str(uuid.UUID(int=self.rng.getrandbits(128))))
        return None if found is None else uuid.UUID(str(found))

    def _first_id_from(self, table: sql.Identifier, pick: Any) -> Any:
        """The first id at or after `pick`, wrapping around to the smallest; None when the table is empty."""
        self.cur.execute(sql.SQL("SELECT id FROM {} WHERE id >= %s ORDER BY id LIMIT 1").format(table), (pick,))
        row = self.cur.fetchone()
        if row is None:
            self.cur.execute(sql.SQL("SELECT id FROM {} ORDER BY id LIMIT 1").format(table))
            row = self.cur.fetchone()
        return None if row is None else row[0]

    # --- operations -------------------------------------------------------------------------

    def _insert(self, table: sql.Composable, values: dict[str, Any], returning: bool = False) -> Any:
        query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            table,
            sql.SQL(", ").join(map(sql.Identifier, values)),
            sql.SQL(", ").join(sql.Placeholder() * len(values)),
        )
        if returning:
            query = query + sql.SQL(" RETURNING id")
        self.cur.execute(query, [str(v) if isinstance(v, uuid.UUID) else v for v in values.values()])
        if not returning:
            return None
        row = self.cur.fetchone()
        assert row is not None, "INSERT ... RETURNING returned no row"
        return int(row[0])

    def insert_person(self) -> int:
        person_id = int(self._insert(self.person, self.rows.person(), returning=True))
        self.counts["insert person"] += 1
        if self._id_range is not None:
            self._id_range = (self._id_range[0], max(self._id_range[1], person_id))
        return person_id

    def insert(self) -> None:
        person_id = self.random_person() if self.rng.random() < 0.5 else None
        if person_id is None:
            self.insert_person()
            return
        self._insert(self.orders, self.rows.order(person_id, self.rng.random() < self.big_ratio))
        self.counts["insert orders"] += 1

    def update(self) -> None:
        """Update an order or a person (whichever exists when the other table is empty)."""
        order_id = self.random_order() if self.rng.random() < 0.5 else None
        if order_id is not None:
            self.update_order(order_id)
            return
        person_id = self.random_person()
        if person_id is not None:
            self.update_person(person_id)
            return
        order_id = self.random_order()
        if order_id is not None:
            self.update_order(order_id)
        else:
            self.insert_person()

    def update_person(self, person_id: int) -> None:
        values = self.rows.person()
        column = self.rng.choice(PERSON_UPDATES)
        sets = [sql.SQL("{} = %s").format(sql.Identifier(column)), sql.SQL("updated_at = now()")]
        params: list[Any] = [values[column]]
        if self.rng.random() < self.key_change_ratio:
            sets.append(sql.SQL("id = nextval(pg_get_serial_sequence(%s, 'id'))"))
            params.append(self._person_regclass())
            self.counts["key change person"] += 1
        self.cur.execute(
            sql.SQL("UPDATE {} SET {} WHERE id = %s").format(self.person, sql.SQL(", ").join(sets)),
            [*params, person_id],
        )
        self.counts["update person"] += 1

    def _person_regclass(self) -> str:
        return '"' + self.schema.replace('"', '""') + '".person'

    def update_order(self, order_id: uuid.UUID) -> None:
        sets = [sql.SQL("status = %s"), sql.SQL("amount = %s")]
        params: list[Any] = [self.rng.choice(STATUSES), self.rows.money(10_000)]
        if self.rng.random() < self.big_ratio:
            sets.append(sql.SQL("note = %s"))
            params.append(self.rows.big_text())
        if self.rng.random() < self.key_change_ratio:
            sets.append(sql.SQL("id = %s"))
            params.append(str(uuid.UUID(int=self.rng.getrandbits(128), version=4)))
            self.counts["key change orders"] += 1
        self.cur.execute(
            sql.SQL("UPDATE {} SET {} WHERE id = %s").format(self.orders, sql.SQL(", ").join(sets)),
            [*params, str(order_id)],
        )
        self.counts["update orders"] += 1

    def delete(self) -> None:
        """Delete an order, or now and then a person (with its orders)."""
        if self.rng.random() >= 0.3:
            order_id = self.random_order()
            if order_id is not None:
                self.cur.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(self.orders), (str(order_id),))
                self.counts["delete orders"] += 1
                return
        person_id = self.random_person()
        if person_id is None:
            self.insert_person()
            return
        self.cur.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(self.person), (person_id,))
        self.counts["delete person"] += 1

    def totals(self) -> dict[str, int]:
        """Operations by kind (insert, update, delete), whatever the table."""
        out = {"insert": 0, "update": 0, "delete": 0}
        for key, n in self.counts.items():
            kind = key.split()[0]
            if kind in out:
                out[kind] += n
        return out
