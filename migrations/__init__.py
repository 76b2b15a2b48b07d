"""Alembic migrations of the dsreg catalog (a package so that it ships inside the wheel)."""
