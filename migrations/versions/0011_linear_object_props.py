"""``object_props`` in time linear in the object's size.

A whole-object update rebuilds the object's ``props`` from its payload and its property rows
(statements.py, ``objects.merge_whole``). ``object_props`` did that one property at a time:
each ``jsonb_set`` copies the whole document, so an object with n property rows cost n copies
of an n-sized document (1k rows 0.27 s, 5k 8 s, 10k 31 s; 25k rows passed the 120 s command
timeout and stalled the mirror: issue 18 item 1).

Now each level of the tree is built once: the property rows are grouped by their first path
element, the direct ones merged into the level with one ``||``, the deeper ones built
recursively and merged with a second ``||``. Work is the number of rows times the depth of
their paths. The result is the one the old loop gave: removals (tombstones newer than the
payload) first, then the rows, shallower paths before deeper ones, a deeper row turning a
non-object on its way into an object. One difference, on purpose: a tombstone path that
crosses a JSON array no longer removes an array element by its index (``#-`` did); property
paths name object keys.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 21:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = [
    # entries: [[path, value], ...] with distinct paths. Sets each path in target.
    """
    CREATE FUNCTION {s}.jsonb_set_tree(target jsonb, entries jsonb)
    RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
    DECLARE
        result jsonb;
    BEGIN
        IF entries IS NULL OR jsonb_array_length(entries) = 0 THEN
            RETURN target;
        END IF;
        result := CASE WHEN jsonb_typeof(target) = 'object' THEN target ELSE '{}'::jsonb END;
        result := result || coalesce(
            (SELECT jsonb_object_agg(e -> 0 ->> 0, e -> 1)
             FROM jsonb_array_elements(entries) AS x(e)
             WHERE jsonb_array_length(e -> 0) = 1),
            '{}'::jsonb);
        RETURN result || coalesce(
            (SELECT jsonb_object_agg(g.key, {s}.jsonb_set_tree(result -> g.key, g.below))
             FROM (SELECT e -> 0 ->> 0 AS key,
                          jsonb_agg(jsonb_build_array((e -> 0) - 0, e -> 1)) AS below
                   FROM jsonb_array_elements(entries) AS x(e)
                   WHERE jsonb_array_length(e -> 0) > 1
                   GROUP BY 1) g),
            '{}'::jsonb);
    END $$
    """,
    # paths: [path, ...]. Removes each path from target where its levels are objects.
    """
    CREATE FUNCTION {s}.jsonb_drop_tree(target jsonb, paths jsonb)
    RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
    DECLARE
        result jsonb;
    BEGIN
        IF paths IS NULL OR jsonb_array_length(paths) = 0
           OR jsonb_typeof(target) IS DISTINCT FROM 'object' THEN
            RETURN target;
        END IF;
        result := target - coalesce(
            (SELECT array_agg(p ->> 0) FROM jsonb_array_elements(paths) AS x(p)
             WHERE jsonb_array_length(p) = 1),
            '{}'::text[]);
        RETURN result || coalesce(
            (SELECT jsonb_object_agg(g.key, {s}.jsonb_drop_tree(result -> g.key, g.below))
             FROM (SELECT p ->> 0 AS key, jsonb_agg(p - 0) AS below
                   FROM jsonb_array_elements(paths) AS x(p)
                   WHERE jsonb_array_length(p) > 1
                   GROUP BY 1) g
             WHERE result ? g.key),
            '{}'::jsonb);
    END $$
    """,
    """
    CREATE OR REPLACE FUNCTION {s}.object_props(p_api text, p_origin text, p_id bigint,
                                                p_base jsonb, p_base_ts timestamptz)
    RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
    DECLARE
        result jsonb := coalesce(p_base, '{}'::jsonb);
    BEGIN
        IF p_base IS NOT NULL AND p_base_ts IS NOT NULL THEN
            result := {s}.jsonb_drop_tree(result, (
                SELECT jsonb_agg(to_jsonb(path)) FROM object_properties_tombstones
                WHERE api = p_api AND origin = p_origin AND id = p_id AND ts > p_base_ts));
        END IF;
        RETURN {s}.jsonb_set_tree(result, (
            SELECT jsonb_agg(jsonb_build_array(to_jsonb(path), value)) FROM object_properties
            WHERE api = p_api AND origin = p_origin AND id = p_id
              AND (p_base IS NULL OR p_base_ts IS NULL OR ts > p_base_ts
                   OR NOT (p_base ? path[1]))));
    END $$
    """,
]


def _schema() -> str:
    return '"' + op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one() + '"'


def upgrade() -> None:
    s = _schema()
    for function in FUNCTIONS:
        op.execute(function.replace("{s}", s))


def downgrade() -> None:
    accounts = context.script.get_revision("0002").module
    op.execute(next(f for f in accounts.FUNCTIONS if "object_props" in f))
    op.execute("DROP FUNCTION jsonb_drop_tree(jsonb, jsonb)")
    op.execute("DROP FUNCTION jsonb_set_tree(jsonb, jsonb)")
