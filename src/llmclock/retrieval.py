"""Retrieval for `llmclock chat --docs DIR`: passages of a folder of text in an SQLite FTS5 index
(SQLite ships with Python), ranked by BM25.

The index is built once and cached (by default under ~/.cache/llmclock); opening it again
re-indexes only files whose size, modification time and content hash changed, and drops files
that are gone.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .errors import LLMClockError

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT);
CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5(path UNINDEXED, n UNINDEXED, text, tokenize='porter unicode61');
"""


@dataclass
class Passage:
    path: str
    n: int
    """The passage's number within its file (0-based)."""
    text: str
    score: float
    """BM25 relevance (higher is better)."""


def split_passages(text: str, max_chars: int = 800) -> list[str]:
    """Paragraphs (blank-line separated), merged up to `max_chars`; a longer paragraph is cut."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        while len(para) > max_chars:
            if cur:
                out.append(cur)
                cur = ""
            out.append(para[:max_chars])
            para = para[max_chars:].strip()
        if cur and len(cur) + len(para) + 2 > max_chars:
            out.append(cur)
            cur = ""
        if para:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


def default_index_path(docs: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmclock"
    return base / f"docs-{hashlib.sha256(str(docs.resolve()).encode()).hexdigest()[:16]}.sqlite"


class DocIndex:
    """A cached FTS5 index of the text files under `docs`."""

    def __init__(self, docs: str | Path, index_path: str | Path | None = None, *, max_chars: int = 800):
        self.docs = Path(docs)
        if not self.docs.is_dir():
            raise LLMClockError(f"--docs {self.docs}: not a directory")
        self.path = Path(index_path) if index_path else default_index_path(self.docs)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_chars = max_chars
        try:
            self.db = sqlite3.connect(self.path)
            self.db.executescript(SCHEMA)
        except sqlite3.OperationalError as e:
            raise LLMClockError(f"{self.path}: cannot open the index ({e}; is SQLite built with FTS5?)") from None

    def refresh(self) -> dict:
        """Bring the index up to date with the folder: {'indexed': n, 'unchanged': n, 'removed': n}."""
        from .corpus import expand_sources

        seen, counts = set(), {"indexed": 0, "unchanged": 0, "removed": 0}
        known = {row[0]: row[1:] for row in self.db.execute("SELECT path, size, mtime_ns, sha256 FROM files")}
        with self.db:
            for f in expand_sources([self.docs]):
                key = str(f.relative_to(self.docs))
                seen.add(key)
                st = f.stat()
                old = known.get(key)
                if old and old[0] == st.st_size and old[1] == st.st_mtime_ns:
                    counts["unchanged"] += 1
                    continue
                data = f.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if old and old[2] == digest:
                    self.db.execute("UPDATE files SET size=?, mtime_ns=? WHERE path=?", (st.st_size, st.st_mtime_ns, key))
                    counts["unchanged"] += 1
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    continue  # not text
                self.db.execute("DELETE FROM passages WHERE path=?", (key,))
                self.db.executemany("INSERT INTO passages (path, n, text) VALUES (?, ?, ?)",
                                    [(key, i, p) for i, p in enumerate(split_passages(text, self.max_chars))])
                self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", (key, st.st_size, st.st_mtime_ns, digest))
                counts["indexed"] += 1
            for key in set(known) - seen:
                self.db.execute("DELETE FROM passages WHERE path=?", (key,))
                self.db.execute("DELETE FROM files WHERE path=?", (key,))
                counts["removed"] += 1
        return counts

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The `k` passages most relevant to `query` (any of its words; BM25 ranking)."""
        words = re.findall(r"\w+", query.lower())
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in dict.fromkeys(words))
        rows = self.db.execute(
            "SELECT path, n, text, bm25(passages) AS s FROM passages WHERE passages MATCH ? ORDER BY s LIMIT ?",
            (match, k),
        ).fetchall()
        return [Passage(path, int(n), text, -score) for path, n, text, score in rows]

    def close(self) -> None:
        self.db.close()


def with_passages(messages: list[dict], passages: list[Passage], fits) -> tuple[list[dict], list[Passage]]:
    """The conversation with the best passages that fit put in a system message in front;
    `fits(messages)` says whether a rendered prompt is within the context budget. Lower-ranked
    passages are dropped first. Returns (messages, passages used)."""
    used = list(passages)
    while used:
        context = "\n\n".join(f"[{i + 1}] ({p.path}) {p.text}" for i, p in enumerate(used))
        msgs = [{"role": "system", "content": f"Answer from these passages.\n\n{context}"}] + messages
        if fits(msgs):
            return msgs, used
        used.pop()
    return messages, []
