"""Nuclei streamed to disk, tile by tile, in an SQLite file: nothing holds all instances in memory.

The reference tools need 80–120 GB of RAM to post-process a slide because they keep every polygon (WSI.md
§8); here each tile's instances are appended as soon as they are found, and the exports (GeoJSON, DICOM
annotations) read them back in batches, in insertion order, so identifiers are reproducible.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["Nucleus", "NucleusStore"]


@dataclass(frozen=True)
class Nucleus:
    """One nucleus in level-0 pixel coordinates; ``polygon`` is (K, 2) float32 (x, y), not closed."""

    id: int
    x: float
    y: float
    area_um2: float
    class_index: int
    probability: float
    polygon: np.ndarray


class NucleusStore:
    """Append-only store of nuclei for one slide analysis."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        self.db = sqlite3.connect(str(self.path))
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("create table nuclei (id integer primary key, x real, y real, area_um2 real, "
                        "class integer, probability real, polygon blob)")
        self._count = 0

    @classmethod
    def open(cls, path: Path | str) -> "NucleusStore":
        """An existing store, to read it back (exports)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.db = sqlite3.connect(str(self.path))
        self._count = int(self.db.execute("select count(*) from nuclei").fetchone()[0])
        return self

    def add(self, x: np.ndarray, y: np.ndarray, area_um2: np.ndarray, class_index: np.ndarray,
            probability: np.ndarray, polygons: list[np.ndarray]) -> None:
        rows = [(float(a), float(b), float(c), int(d), float(e), np.ascontiguousarray(p, np.float32).tobytes())
                for a, b, c, d, e, p in zip(x, y, area_um2, class_index, probability, polygons)]
        self.db.executemany("insert into nuclei (x, y, area_um2, class, probability, polygon) "
                            "values (?, ?, ?, ?, ?, ?)", rows)
        self._count += len(rows)

    def __len__(self) -> int:
        return self._count

    def commit(self) -> None:
        self.db.commit()

    def iter(self, batch: int = 20_000, class_index: int | None = None) -> Iterator[Nucleus]:
        """Every nucleus in insertion order (optionally of one class), read ``batch`` rows at a time."""
        self.db.commit()
        last = 0
        where = "" if class_index is None else f" and class = {int(class_index)}"
        while True:
            rows = self.db.execute(f"select id, x, y, area_um2, class, probability, polygon from nuclei "
                                   f"where id > ?{where} order by id limit ?", (last, batch)).fetchall()
            if not rows:
                return
            for row in rows:
                yield Nucleus(row[0], row[1], row[2], row[3], row[4], row[5],
                              np.frombuffer(row[6], np.float32).reshape(-1, 2))
            last = rows[-1][0]

    def class_counts(self) -> dict[int, int]:
        self.db.commit()
        return dict(self.db.execute("select class, count(*) from nuclei group by class").fetchall())

    def close(self) -> None:
        self.db.commit()
        self.db.close()
