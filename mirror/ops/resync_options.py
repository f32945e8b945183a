"""What the ``backfill`` and ``reconcile`` commands take beyond the broker and the database.

Plain dataclasses, so ``options.py`` can declare their flags (their defaults are these fields')
without importing the machinery of ``resync.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackfillRequest:
    begin: str = ""  # --from: Unix seconds or ISO 8601; required
    end: str | None = None  # --to; None: now
    devices: tuple[str, ...] = ()  # device ids; empty: every device flespi lists
    intervals: bool = True
    page_size: int = 1000


@dataclass(frozen=True)
class ReconcileRequest:
    max_delete_fraction: float = 0.5
