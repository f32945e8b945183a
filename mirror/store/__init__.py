"""Store: how records reach PostgreSQL.

schema (tables and views), database (engines, migrations), batch (coalescing a batch: newest
wins), statements (one statement per family), writer (the write, its retries and dead letters),
partitions, history, compaction, summaries, dead_letters, extensions, embedded. May import
``decode`` and ``ops``; never the session or the repair.
"""
