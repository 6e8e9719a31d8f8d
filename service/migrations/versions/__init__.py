"""One Alembic revision per schema change, oldest first (``NNNN_what.py``)."""
