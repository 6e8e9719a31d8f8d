"""Alembic migrations of the service's store (see :mod:`tether.service.schema` and README.md here)."""
