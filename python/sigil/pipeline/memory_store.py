"""The offline pipeline's memory: a local SQLite full-text store.

Lives in ``<sigil home>/memory.db`` (0600). On first use it is created and seeded
with a few example items so the offline pipeline has something to retrieve with
no setup. Retrieval is SQLite FTS5 with BM25 ranking when this Python's SQLite
has FTS5 (CPython's builds do); otherwise a plain table ranked in Python by term
frequency, so the pipeline still works (with slightly different ranking).

Everything here blocks on the disk: call it from a worker thread
(``asyncio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sigil.core.file_security import check_not_symlink, ensure_private_file

__all__ = ["SEED_MEMORIES", "MemoryItem", "MemoryStore", "fts5_available", "query_terms"]

SCHEMA_VERSION = "1"

# fmt: off
_STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from", "has",
    "have", "how", "i", "in", "is", "it", "its", "of", "on", "or", "our", "please", "should",
    "that", "the", "their", "them", "then", "there", "these", "this", "to", "was", "we", "what",
    "when", "where", "which", "who", "why", "will", "with", "you", "your", "into", "about",
    "over", "under", "than", "more", "most", "some", "any", "all", "give", "make", "tell", "me",
    "my", "us",
})
# fmt: on

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True, slots=True)
class MemoryItem:
    id: str
    intent: str
    title: str
    content: str
    tags: str
    score: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "intent": self.intent,
            "title": self.title,
            "content": self.content,
            "tags": self.tags,
            "score": self.score,
        }


# (id, intent, title, content, tags): fictional, written for the examples of the spec.
SEED_MEMORIES: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "mem-001",
        "lead_analysis",
        "Lead qualification checklist (BANT)",
        "Qualify a lead on four points: Budget (is money allocated), Authority (who signs), "
        "Need (the pain in their words) and Timeline (when they must decide). A lead missing "
        "two or more points is nurtured, not pursued.",
        "lead sales qualification bant prospect",
    ),
    (
        "mem-002",
        "lead_analysis",
        "Acme Corp account notes",
        "Acme Corp is a mid-market manufacturer of industrial sensors with about 1,200 "
        "employees. Their operations team evaluated monitoring tools last quarter; the "
        "VP of Operations owns the budget and wants a decision before the fiscal year ends.",
        "acme corp account customer lead manufacturer",
    ),
    (
        "mem-003",
        "lead_analysis",
        "Signals of a strong lead",
        "Strong leads reply within two days, bring a second stakeholder to the follow-up "
        "call, and ask about pricing tiers and security review. Weak leads ask only for "
        "documentation and go quiet after the demo.",
        "lead signals engagement prospect deal",
    ),
    (
        "mem-004",
        "research",
        "Competitive research method",
        "Compare competitors on the same five axes: target customer, pricing model, core "
        "feature set, integration depth and support quality. Cite one public source per "
        "claim and date every observation.",
        "research competitor market comparison analysis",
    ),
    (
        "mem-005",
        "research",
        "Market sizing (TAM, SAM, SOM)",
        "Size a market top-down from industry reports and bottom-up from the number of "
        "reachable customers times the expected contract value; trust the bottom-up "
        "figure when the two disagree by more than a factor of three.",
        "market sizing research tam sam som",
    ),
    (
        "mem-006",
        "code_review",
        "Code review guidelines",
        "Review for correctness first, then failure handling, then readability. Every "
        "bug fix needs a test that failed before the fix. Ask for smaller changes when a "
        "diff touches more than one concern.",
        "code review bug test refactor",
    ),
    (
        "mem-007",
        "code_review",
        "Async Python pitfalls",
        "Never block the event loop: file and network I/O go through a thread or an async "
        "client. Cancel tasks you start, and always await or gather them so exceptions "
        "are not lost.",
        "python async asyncio code event loop",
    ),
    (
        "mem-008",
        "summarization",
        "Summary style guide",
        "Lead with the conclusion in one sentence, then at most five bullet points of "
        "supporting facts, then open questions. Keep names, numbers and dates exactly "
        "as in the source.",
        "summary summarize digest notes style",
    ),
    (
        "mem-009",
        "planning",
        "Project plan template",
        "A plan names the goal, the milestones with owners and dates, the risks with a "
        "mitigation each, and the first step that can start today. Re-plan when a "
        "milestone slips by more than a week.",
        "plan project roadmap milestone timeline",
    ),
    (
        "mem-010",
        "general",
        "Token budget guidance",
        "Keep the reasoning step within its allocation by retrieving fewer, more relevant "
        "memories; a session that passes 80 percent of its budget should finish the "
        "current step and report rather than start new work.",
        "token budget cost reasoning sigil",
    ),
    (
        "mem-011",
        "question_answering",
        "Writing clear answers",
        "Answer the question asked in the first sentence, give the reason in the second, "
        "and add an example only when it removes ambiguity. Say plainly when the "
        "information is not known.",
        "answer question explain clear",
    ),
    (
        "mem-012",
        "research",
        "Customer churn signals",
        "Falling weekly active users, support tickets about billing, and a champion "
        "leaving the customer are the three strongest predictors of churn in the next "
        "quarter.",
        "churn customer retention research signals",
    ),
)

_backend_lock = threading.Lock()
_backend: str | None = None


def fts5_available() -> bool:
    """Whether this Python's SQLite was built with FTS5."""
    global _backend
    with _backend_lock:
        if _backend is None:
            try:
                con = sqlite3.connect(":memory:")
                try:
                    con.execute("CREATE VIRTUAL TABLE probe USING fts5(x)")
                    _backend = "fts5"
                finally:
                    con.close()
            except sqlite3.OperationalError:
                _backend = "scan"
    return _backend == "fts5"


def query_terms(text: str, limit: int = 16) -> list[str]:
    """Distinct lower-case content words of ``text`` (no stopwords, >= 3 chars), in order."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(text.lower()):
        if len(word) >= 3 and word not in _STOPWORDS and word not in seen:
            seen[word] = None
            if len(seen) >= limit:
                break
    return list(seen)


class MemoryStore:
    """Seeded, read-mostly full-text store of memory items."""

    def __init__(self, path: Path, *, backend: str | None = None) -> None:
        """
        Args:
            path: the database file (created 0600 with its directory 0700).
            backend: ``"fts5"`` or ``"scan"``; default: FTS5 when available.
        """
        self.path = Path(path)
        self.backend = backend or ("fts5" if fts5_available() else "scan")
        if self.backend not in ("fts5", "scan"):
            raise ValueError(f"unknown memory backend {self.backend!r}")
        self._table = "memories_fts" if self.backend == "fts5" else "memories_scan"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        _ensure_private_dir(self.path.parent)
        # The database and SQLite's side files are opened by name: a symlink planted
        # at any of them would redirect SQLite's writes, so it is refused (contract 8).
        for side in ("-journal", "-wal", "-shm"):
            check_not_symlink(self.path.with_name(self.path.name + side))
        ensure_private_file(self.path)
        con = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout = 10000")
            yield con
        finally:
            con.close()

    def _ensure(self, con: sqlite3.Connection) -> None:
        if self._seeded(con):
            return
        # BEGIN IMMEDIATE serialises concurrent first uses: the loser re-checks and skips.
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute("CREATE TABLE IF NOT EXISTS sigil_meta (key TEXT PRIMARY KEY, value TEXT)")
            if self.backend == "fts5":
                con.execute(
                    "CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5("
                    "id UNINDEXED, intent UNINDEXED, title, content, tags, "
                    "tokenize = 'porter unicode61')"
                )
            else:
                con.execute(
                    "CREATE TABLE IF NOT EXISTS memories_scan (id TEXT PRIMARY KEY, intent TEXT, "
                    "title TEXT, content TEXT, tags TEXT)"
                )
            key = f"seeded_{self.backend}"
            row = con.execute("SELECT value FROM sigil_meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                con.executemany(
                    f"INSERT INTO {self._table} (id, intent, title, content, tags) "
                    "VALUES (?, ?, ?, ?, ?)",
                    SEED_MEMORIES,
                )
                con.execute("INSERT INTO sigil_meta VALUES (?, ?)", (key, SCHEMA_VERSION))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _seeded(self, con: sqlite3.Connection) -> bool:
        try:
            row = con.execute(
                "SELECT value FROM sigil_meta WHERE key = ?", (f"seeded_{self.backend}",)
            ).fetchone()
        except sqlite3.OperationalError:
            return False
        return row is not None

    def add(self, item: MemoryItem) -> None:
        """Add one item (for users who keep their own memories here)."""
        with self._connect() as con:
            self._ensure(con)
            con.execute(
                f"INSERT INTO {self._table} (id, intent, title, content, tags) "
                "VALUES (?, ?, ?, ?, ?)",
                (item.id, item.intent, item.title, item.content, item.tags),
            )

    def search(self, text: str, *, limit: int = 5, intent: str | None = None) -> list[MemoryItem]:
        """The ``limit`` items most relevant to ``text``, best first (deterministic).

        Items whose intent matches ``intent`` get a small boost, so that a task
        classified as lead analysis prefers lead-analysis memories on a tie.
        """
        terms = query_terms(text)
        if not terms:
            return []
        with self._connect() as con:
            self._ensure(con)
            if self.backend == "fts5":
                items = self._search_fts5(con, terms, limit * 3)
            else:
                items = self._search_scan(con, terms)
        boosted = [
            MemoryItem(
                i.id,
                i.intent,
                i.title,
                i.content,
                i.tags,
                round(i.score + (0.5 if intent is not None and i.intent == intent else 0.0), 6),
            )
            for i in items
        ]
        boosted.sort(key=lambda i: (-i.score, i.id))
        return boosted[:limit]

    def _search_fts5(
        self, con: sqlite3.Connection, terms: list[str], limit: int
    ) -> list[MemoryItem]:
        query = " OR ".join(f'"{t}"' for t in terms)
        rows = con.execute(
            "SELECT id, intent, title, content, tags, bm25(memories_fts, 0, 0, 3.0, 1.0, 2.0) "
            "FROM memories_fts WHERE memories_fts MATCH ? "
            "ORDER BY bm25(memories_fts, 0, 0, 3.0, 1.0, 2.0), id LIMIT ?",
            (query, limit),
        ).fetchall()
        # bm25() is lower-is-better and negative; flip it so higher is better.
        return [MemoryItem(r[0], r[1], r[2], r[3], r[4], round(-float(r[5]), 6)) for r in rows]

    def _search_scan(self, con: sqlite3.Connection, terms: list[str]) -> list[MemoryItem]:
        rows = con.execute(
            "SELECT id, intent, title, content, tags FROM memories_scan ORDER BY id"
        ).fetchall()
        items = []
        for r in rows:
            fields = ((r[2], 3.0), (r[3], 1.0), (r[4], 2.0))
            score = 0.0
            for value, weight in fields:
                words = _WORD.findall(value.lower())
                score += weight * sum(1 for w in words if any(w.startswith(t) for t in terms))
            if score > 0:
                items.append(MemoryItem(r[0], r[1], r[2], r[3], r[4], round(score, 6)))
        return items


def _ensure_private_dir(path: Path) -> None:
    if path.is_dir():
        return
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
