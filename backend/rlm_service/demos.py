"""The three demos' sample data, made here (no downloads): `rlm-service sample NAME > file`.

- `log`: a large service log with incidents in it, to chunk into 20 parts and summarise in parallel;
- `numbers`: response times scattered through prose, for their mean, standard deviation and distribution;
- `records`: book records in a made-up format, for a parser written, tested on the first 5 and fixed.

The data is a function of the seed: the same command makes the same file.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Demo:
    """One demo: its sample data and the task to run on it."""

    name: str
    prompt: str
    make: Callable[[random.Random, int], str]
    count: int
    """How many lines, numbers or records `make` produces unless told otherwise."""


_SERVICES = ("checkout-api", "auth", "search", "inventory", "payments", "mailer")
_PATHS = ("/api/cart", "/api/login", "/api/search?q=shoes", "/api/items/42", "/api/pay", "/api/orders")


def make_log(rng: random.Random, lines: int) -> str:
    """A service log of `lines` lines over one day, with four incidents a summary should find: a database
    outage on the checkout path, a burst of payment-provider timeouts, a bad deploy of search that a
    rollback fixed, and a disk filling up on the mailer."""
    start = datetime(2025, 3, 14, 0, 0, 0)
    step = 86_400 / max(lines, 1)
    out = []
    for index in range(lines):
        at = start + timedelta(seconds=index * step + rng.random() * step)
        hour = at.hour + at.minute / 60
        stamp = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
        request = f"req={rng.getrandbits(32):08x}"
        if 9.5 <= hour < 10.25 and rng.random() < 0.6:
            out.append(
                f"{stamp} ERROR checkout-api {request} db: connection pool exhausted (50/50 in use), "
                f"waited {rng.randint(5000, 30000)}ms"
            )
        elif 14.0 <= hour < 14.5 and rng.random() < 0.4:
            out.append(f"{stamp} WARN  payments {request} provider timeout after 10000ms, retry {rng.randint(1, 3)}/3")
        elif 17.0 <= hour < 17.75 and rng.random() < 0.5:
            out.append(f"{stamp} ERROR search {request} NullPointerException in RankingV2.score (build 2025.03.14-2)")
        elif 21.0 <= hour and rng.random() < 0.05:
            out.append(f"{stamp} WARN  mailer disk /var/spool at {min(99, int(80 + (hour - 21) * 6))}% full")
        elif rng.random() < 0.002:
            out.append(f"{stamp} INFO  deploy {rng.choice(_SERVICES)} build 2025.03.14-{rng.randint(1, 3)} rolled out")
        else:
            service, path = rng.choice(_SERVICES), rng.choice(_PATHS)
            status = rng.choices((200, 201, 304, 404, 500), (80, 5, 8, 6, 1))[0]
            level = "ERROR" if status == 500 else "INFO "
            out.append(
                f"{stamp} {level} {service} {request} {rng.choice(('GET', 'POST'))} {path} {status} "
                f"{max(1, int(rng.lognormvariate(3.5, 0.6)))}ms"
            )
        if index == lines * 71 // 100:
            out.append(f"{stamp} INFO  deploy search build 2025.03.14-2 rolled out")
        if index == lines * 74 // 100:
            out.append(f"{stamp} INFO  deploy search rolled back to build 2025.03.14-1")
    return "\n".join(out) + "\n"


_PLACES = ("the Lisbon edge", "the Frankfurt cluster", "the Oregon replica", "the Tokyo cache", "the on-call laptop")
_SENTENCES = (
    "At {clock} a request through {place} took {value} ms, and {count} others queued behind it.",
    "The probe from {place} came back in {value} ms (attempt {count}).",
    "Someone on the team noted at {clock} that {place} answered in {value} ms.",
    "{count} users reported slowness; the trace shows {value} ms spent in {place}.",
    "Nothing unusual at {clock}: {place} replied after {value} ms.",
)
_FILLER = (
    "The weather was calm and the release train left on time.",
    "Coffee ran out on the third floor around noon.",
    "Ticket 4411 was closed as a duplicate of ticket 3920.",
    "The dashboards were redrawn twice because of a browser update.",
)


def make_numbers(rng: random.Random, count: int) -> str:
    """Prose notes with `count` response times in them (the numbers followed by "ms"), drawn from two
    populations (fast cached answers and slow uncached ones); times of day, counts and ticket numbers are
    there too and are not response times."""
    out = []
    for _ in range(count):
        value = rng.gauss(120, 18) if rng.random() < 0.65 else rng.gauss(310, 45)
        clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        out.append(
            rng.choice(_SENTENCES).format(
                clock=clock, place=rng.choice(_PLACES), value=f"{max(value, 5):.1f}", count=rng.randint(2, 40)
            )
        )
        if rng.random() < 0.3:
            out.append(rng.choice(_FILLER))
    paragraphs = [" ".join(out[i : i + 6]) for i in range(0, len(out), 6)]
    return "\n\n".join(paragraphs) + "\n"


_FIRST = ("Mara", "Tomas", "Ines", "Kofi", "Yuki", "Lena", "Omar", "Priya", "Jonas", "Ada")
_LAST = ("Ellison", "Reyes", "Okafor", "Tanaka", "Lindqvist", "Haddad", "Rao", "Novak", "Byrne", "Costa")
_WORDS = (
    "Quiet",
    "Harbour",
    "Glass",
    "River",
    "Winter",
    "Cartographer",
    "Salt",
    "Orchard",
    "Signal",
    "Lantern",
    "Paper",
    "Atlas",
    "Night",
    "Garden",
    "Iron",
    "Letters",
)


@dataclass(frozen=True)
class Book:
    """One record of the `records` demo, as a correct parser recovers it."""

    id: int
    title: str
    authors: tuple[str, ...]
    year: int
    edition: int | None
    price_eur: float | None
    shelf: str
    notes: str


def book_records(rng: random.Random, count: int) -> list[Book]:
    """The records that `make_records` writes (given a generator in the same state), as data."""
    books = []
    for number in range(1, count + 1):
        title = ("The " if rng.random() < 0.4 else "") + " ".join(rng.sample(_WORDS, rng.randint(1, 3)))
        if rng.random() < 0.15:
            title += f": {rng.choice(_WORDS)} and {rng.choice(_WORDS)}"
        authors = tuple(
            f"{rng.choice(_FIRST)} {rng.choice(_LAST)}" for _ in range(rng.choices((1, 2, 3), (70, 25, 5))[0])
        )
        year = rng.randint(1890, 2024)
        shelf = f"{rng.choice('ABCDEFG')}-{rng.randint(1, 30)}/{rng.randint(1, 9)}"
        edition = rng.randint(2, 5) if rng.random() < 0.2 else None
        price = round(rng.uniform(4, 60), 2) if rng.random() < 0.7 else None
        notes = []
        if rng.random() < 0.35:
            notes.append(
                f"Signed copy; {rng.choice(_WORDS).lower()} on the cover."
                if rng.random() < 0.5
                else "Key:: value pairs in the notes are part of the notes."
            )
            if rng.random() < 0.5:
                notes.append(f"Donated by {rng.choice(_FIRST)} {rng.choice(_LAST)}.")
        books.append(Book(number, title, authors, year, edition, price, shelf, "\n".join(notes)))
    return books


def _render_book(book: Book, rng: random.Random) -> str:
    def key(name: str) -> str:  # keys are written in any case
        return rng.choice((name, name.upper(), name.lower()))

    edition = f" ({book.edition}. ed.)" if book.edition else ""
    lines = [
        f"=== BOOK #{book.id:04d} ===",
        f"{key('Title')}:: {book.title}",
        f"{key('By')}:: {'; '.join(book.authors)}",
        f"{key('Year')}:: {book.year}{edition}",
    ]
    if book.price_eur is not None:
        lines.append(f"{key('Price')}:: €" + f"{book.price_eur:.2f}".replace(".", ","))
    lines.append(f"{key('Shelf')}:: {book.shelf}")
    if book.notes:
        first, *rest = book.notes.split("\n")
        lines.append(f"{key('Notes')}:: {first}")
        lines.extend(f"    {line}" for line in rest)  # continuation lines are indented
    lines.append("=== END ===")
    return "\n".join(lines)


def make_records(rng: random.Random, count: int) -> str:
    """`count` book records in a made-up format: a header and an END line around `Key:: value` lines whose
    keys come in any case; authors separated by `;`; a year with an optional edition, "1987 (2. ed.)"; a
    price in euros with a decimal comma; optional fields left out; notes that go on over indented lines and
    may contain `::` themselves; one or two blank lines between records."""
    books = book_records(rng, count)
    blocks = [_render_book(book, rng) + "\n" * rng.choice((1, 2)) for book in books]
    return "\n".join(blocks)


DEMOS = {
    demo.name: demo
    for demo in (
        Demo(
            "log",
            "Chunk this log into 20 parts and summarise them in parallel (one llm_batch), then combine the "
            "summaries into one report: what happened over the day, when, and which errors were most frequent.",
            make_log,
            20_000,
        ),
        Demo(
            "numbers",
            "Find every response time (the numbers in ms) in this text, give their mean and standard "
            "deviation, and plot their distribution.",
            make_numbers,
            600,
        ),
        Demo(
            "records",
            "Write a parser for these book records, test it on the first 5 entries, and fix it until it is "
            "100% accurate on them; then parse all of them and report how many there are, how many distinct "
            "authors, and the five fullest shelves.",
            make_records,
            400,
        ),
    )
}


def sample(name: str, count: int | None = None, seed: int = 0) -> str:
    """The sample data of demo `name` (`log`, `numbers`, `records`)."""
    demo = DEMOS[name]
    return demo.make(random.Random(seed), demo.count if count is None else count)
