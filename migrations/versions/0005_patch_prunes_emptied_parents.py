"""Object props end the same whether a property removal is patched or rebuilt.

Revision 0002 brings ``objects.props`` up to date two ways: rebuilt from the whole payload and
the live properties (``object_props``, when the whole object changed in the batch) or patched
path by path (``object_patch``). They disagreed on a parent level that only properties had
made: after ``connections/77`` was removed, the rebuild had no ``connections`` key (no live
property below it), the patch kept ``"connections": {}``. Which one a user saw depended on
whether the whole object and the removal arrived in one batch.

``object_patch`` now takes the object's whole payload (``base``) too, and removes a parent
level a removal left empty unless the payload carries it, level by level upwards: the result
the rebuild gives. The two-argument version is dropped (the statements call the new one).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 22:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OBJECT_PATCH = """
    CREATE FUNCTION {s}.object_patch(props jsonb, changes jsonb, base jsonb)
    RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
    DECLARE
        result jsonb := coalesce(props, '{}'::jsonb);
        grp record;
        parent_value jsonb;
        level text[];
    BEGIN
        FOR grp IN
            SELECT path[1:cardinality(path) - 1] AS parent,
                   coalesce(jsonb_object_agg(path[cardinality(path)], value)
                            FILTER (WHERE live), '{}'::jsonb) AS sets,
                   coalesce(array_agg(path[cardinality(path)]) FILTER (WHERE NOT live),
                            '{}'::text[]) AS drops
            FROM (SELECT ARRAY(SELECT jsonb_array_elements_text(c -> 0)) AS path,
                         (c ->> 1)::boolean AS live, c -> 2 AS value
                  FROM jsonb_array_elements(coalesce(changes, '[]'::jsonb)) AS x(c)) ch
            GROUP BY 1
            ORDER BY cardinality(path[1:cardinality(path) - 1]), 1
        LOOP
            IF cardinality(grp.parent) = 0 THEN
                result := (result - grp.drops) || grp.sets;
                CONTINUE;
            END IF;
            parent_value := result #> grp.parent;
            IF parent_value IS NULL AND grp.sets = '{}'::jsonb THEN
                CONTINUE;  -- removing below a level that is not there: nothing to do
            END IF;
            IF parent_value IS NULL OR jsonb_typeof(parent_value) <> 'object' THEN
                parent_value := '{}'::jsonb;
            END IF;
            result := {s}.jsonb_set_deep(result, grp.parent,
                                         (parent_value - grp.drops) || grp.sets);
            -- A level left empty by removals goes too, unless the whole payload has it.
            level := grp.parent;
            WHILE cardinality(level) > 0 AND result #> level = '{}'::jsonb
                  AND (base IS NULL OR base #> level IS NULL) LOOP
                result := result #- level;
                level := level[1:cardinality(level) - 1];
            END LOOP;
        END LOOP;
        RETURN result;
    END $$
"""


def upgrade() -> None:
    s = '"' + op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one() + '"'
    op.execute(OBJECT_PATCH.replace("{s}", s))
    op.execute("DROP FUNCTION object_patch(jsonb, jsonb)")


def downgrade() -> None:
    s = '"' + op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one() + '"'
    accounts = context.script.get_revision("0002").module
    op.execute(next(f for f in accounts.FUNCTIONS if "object_patch" in f).replace("{s}", s))
    op.execute("DROP FUNCTION object_patch(jsonb, jsonb, jsonb)")
