"""Alembic's environment for the node's schema: migrations run on the connection that
`state.migrate.upgrade` hands over, in the transaction that holds its lock."""

from alembic import context

from dicom_node.state import db

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=db.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():  # inside the caller's transaction: no new one
    context.run_migrations()
