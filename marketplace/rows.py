"""Model instances read by statements built once per process, for reads on a hot path.

Compiling a queryset (select_related, only, a Q) cost more CPU per request than running it; the statement is
built once here from the models' own metadata and run through `marketplace.postgresql.prepared_cursor`, so
PostgreSQL plans it once per connection too. The instances are what the ORM gives for the same columns: fields not
read are deferred, values go through the same converters (the backend's and the field's), related instances are
cached on their foreign keys as select_related caches them."""

from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS, connection, connections


@dataclass(frozen=True)
class ModelColumns:
    """Columns of one model read under a table alias, and how to turn their values into an instance."""

    model: type
    alias: str
    select: str  # the columns, for a SELECT list
    attnames: tuple[str, ...]
    converting: tuple  # (position, column expression, converters) of the columns that have converters

    def instance(self, values):
        """The instance of the next len(self.attnames) values of the iterator `values`."""
        row = [next(values) for _ in self.attnames]
        db = connections[DEFAULT_DB_ALIAS]
        for position, column, converters in self.converting:
            for convert in converters:
                row[position] = convert(row[position], column, db)
        return self.model.from_db(DEFAULT_DB_ALIAS, self.attnames, row)


def model_columns(model, alias: str, names: tuple[str, ...] | None = None) -> ModelColumns:
    """`names` (attribute names) of `model`, every concrete field when None, read under table alias `alias`; the
    converters depend on the database's vendor only, so this is built once per process."""
    concrete = model._meta.concrete_fields
    # In the model's order whatever the order of `names`: Model.from_db places a subset's values by that order.
    fields = concrete if names is None else sorted((model._meta.get_field(name) for name in names), key=concrete.index)
    quote, converting = connection.ops.quote_name, []
    for position, field in enumerate(fields):
        column = field.get_col(alias)
        converters = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
        if converters:
            converting.append((position, column, tuple(converters)))
    return ModelColumns(model, alias, ", ".join(f"{alias}.{quote(field.column)}" for field in fields),
                        tuple(field.attname for field in fields), tuple(converting))
