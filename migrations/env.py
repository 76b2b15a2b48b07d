"""Alembic environment: dsreg passes its own connection; the ``alembic`` command line uses
``sqlalchemy.url`` from alembic.ini or else ``DSREG_CATALOG_URL`` / the default registry."""

from alembic import context

from dsreg.tables import Model

config = context.config
target_metadata = Model.metadata


def _url() -> str:
    from dsreg.config import Settings

    return config.get_main_option("sqlalchemy.url") or Settings.resolve().catalog_url


def _run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things in place; batch mode copies the table instead.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        from dsreg.catalog import create_engine  # with SQLite's pragmas, as the library opens it

        engine = create_engine(_url())
        with engine.begin() as conn:
            _run(conn)
        engine.dispose()
