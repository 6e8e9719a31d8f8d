"""Blobs: the ``sha256`` column is ``digest``, since blobs are named and checked by BLAKE3.

Revision ID: 0007_blob_digest
Revises: 0006_task_indexes

Release 3 of the protocol hashes blobs with BLAKE3 (``tether.digest``: 2.5x sha256's speed,
and every byte of a large payload is hashed twice per trip through the service). The column
keeps its type (64 hex characters) and its values: the digests stored before stay what they
were, and nobody hashes a stored blob again (readers compare the digest the service names
with the one in their stub, both from the same upload), so a blob stored before the upgrade
is still read whole. An upload under way at the upgrade breaks off with the service, as at
any restart, and its uploader sends it again with the new digest.

Not for a rolling upgrade: clients, endpoints and every replica move to protocol 3 together
(peers refuse another version in words, and a replica of the previous release would name a
column that is gone). ``RENAME COLUMN``: PostgreSQL, and SQLite since 3.25.
"""

from __future__ import annotations

from alembic import op

revision = "0007_blob_digest"
down_revision = "0006_task_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE blobs RENAME COLUMN sha256 TO digest")


def downgrade() -> None:
    op.execute("ALTER TABLE blobs RENAME COLUMN digest TO sha256")
