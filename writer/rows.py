"""Realistic random rows. Faker fills pools once at start; rows are drawn from the pools, which
keeps the writer cheap enough to sustain thousands of operations per second."""

import base64
import datetime as dt
import random
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from faker import Faker
from psycopg2.extras import Json

CURRENCIES = ("EUR", "USD", "GBP", "JPY", "CHF")
STATUSES = ("new", "paid", "shipped", "delivered", "cancelled")
POOL_SIZE = 500


@dataclass(frozen=True)
class Pools:
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    domains: tuple[str, ...]
    phones: tuple[str, ...]
    addresses: tuple[str, ...]
    words: tuple[str, ...]
    companies: tuple[str, ...]
    jobs: tuple[str, ...]
    sentences: tuple[str, ...]


def make_pools(seed: int | None) -> Pools:
    fake = Faker(["en_US", "de_DE", "fr_FR", "ja_JP"])
    if seed is not None:
        Faker.seed(seed)

    def pool(make: Any, n: int = POOL_SIZE) -> tuple[str, ...]:
        return tuple(str(make()) for _ in range(n))

    return Pools(
        first_names=pool(fake.first_name),
        last_names=pool(fake.last_name),
        domains=pool(fake["en_US"].free_email_domain, 20),
        phones=pool(fake.phone_number),
        addresses=pool(fake.address),
        words=(*pool(fake["en_US"].word), "it's", 'say "hi"', "a,b", "{x}", "back\\slash", "naïve", "日本"),
        companies=pool(fake.company, 100),
        jobs=pool(fake["en_US"].job, 100),
        sentences=pool(fake.sentence, 200),
    )


class RowMaker:
    """Draws person and order values from the pools with a seeded random generator."""

    def __init__(self, pools: Pools, rng: random.Random) -> None:
        self.p = pools
        self.rng = rng

    def person(self) -> dict[str, Any]:
        r, p = self.rng, self.p
        first, last = r.choice(p.first_names), r.choice(p.last_names)
        return {
            "first_name": first,
            "last_name": last,
            "email": f"{first}.{last}{r.randrange(10_000)}@{r.choice(p.domains)}".lower().replace(" ", ""),
            "phone": r.choice(p.phones),
            "address": r.choice(p.addresses),
            "birth_date": dt.date(1940, 1, 1) + dt.timedelta(days=r.randrange(25_000)),
            "balance": self.money(1_000_000),
            "active": r.random() < 0.9,
            "tags": r.sample(p.words, r.randrange(4)),
            "profile": Json(
                {
                    "company": r.choice(p.companies),
                    "job": r.choice(p.jobs),
                    "score": round(r.uniform(0, 100), 3),
                    "newsletter": r.random() < 0.5,
                    "langs": r.sample(["en", "de", "fr", "ja"], r.randrange(1, 3)),
                }
            ),
        }

    def order(self, person_id: int, big: bool) -> dict[str, Any]:
        r = self.rng
        return {
            "id": uuid.UUID(int=r.getrandbits(128), version=4),
            "person_id": person_id,
            "amount": self.money(10_000),
            "currency": r.choice(CURRENCIES),
            "status": r.choice(STATUSES),
            "items": Json(
                [
                    {
                        "sku": f"SKU-{r.randrange(100_000):05d}",
                        "qty": r.randrange(1, 5),
                        "price": str(self.money(500)),
                    }
                    for _ in range(r.randrange(1, 4))
                ]
            ),
            "note": self.big_text() if big else r.choice(self.p.sentences),
        }

    def money(self, upper: int) -> Decimal:
        return Decimal(self.rng.randrange(upper * 100)) / 100

    def big_text(self) -> str:
        """12-24 KB of text that does not compress: stored out of line (TOAST)."""
        size = self.rng.randrange(9_000, 18_000)
        return base64.b64encode(self.rng.randbytes(size)).decode()
