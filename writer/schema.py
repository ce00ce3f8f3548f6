"""The writer's tables, created when missing."""

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

PERSON = sql.SQL("""
CREATE TABLE IF NOT EXISTS {schema}.person (
    id          bigserial PRIMARY KEY,
    first_name  text NOT NULL,
    last_name   text NOT NULL,
    email       text NOT NULL,
    phone       text,
    address     text,
    birth_date  date,
    balance     numeric(12,2) NOT NULL DEFAULT 0,
    active      boolean NOT NULL DEFAULT true,
    tags        text[] NOT NULL DEFAULT '{{}}',
    profile     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
)""")

ORDERS = sql.SQL("""
CREATE TABLE IF NOT EXISTS {schema}.orders (
    id          uuid PRIMARY KEY,
    person_id   bigint NOT NULL REFERENCES {schema}.person (id) ON DELETE CASCADE ON UPDATE CASCADE,
    amount      numeric(12,2) NOT NULL,
    currency    char(3) NOT NULL,
    status      text NOT NULL,
    items       jsonb NOT NULL,
    note        text,
    ordered_at  timestamptz NOT NULL DEFAULT now()
)""")

ORDERS_INDEX = sql.SQL("CREATE INDEX IF NOT EXISTS orders_person_id_idx ON {schema}.orders (person_id)")


def create_tables(cur: Cursor, schema: str = "public") -> None:
    """Create person and orders in `schema` if they do not exist."""
    ident = sql.Identifier(schema)
    for statement in (PERSON, ORDERS, ORDERS_INDEX):
        cur.execute(statement.format(schema=ident))
