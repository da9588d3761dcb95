"""Model instances read by statements built once per process, for reads on a hot path.

Compiling a queryset (select_related, only, a Q) cost more CPU per request than running it; the statement is
built once here from the models' own metadata and run through `marketplace.postgresql.prepared_cursor`, so
PostgreSQL plans it once per connection too. The instances are what the ORM gives for the same columns: fields not
read are deferred, values go through the fields' converters, related instances are cached on their foreign keys as
select_related caches them."""

from dataclasses import dataclass

from django.db import connection


@dataclass(frozen=True)
class ModelColumns:
    """Columns of one model read under a table alias, and how to turn their values into an instance."""

    model: type
    alias: str
    fields: tuple  # (field, column expression, the field's converters)

    @property
    def select(self) -> str:
        quote = connection.ops.quote_name
        return ", ".join(f"{self.alias}.{quote(field.column)}" for field, _, _ in self.fields)

    def instance(self, values):
        """The instance of the next len(self.fields) values of the iterator `values`."""
        converted, ops = [], connection.ops
        for _field, column, converters in self.fields:
            value = next(values)
            for convert in ops.get_db_converters(column) + converters:
                value = convert(value, column, connection)
            converted.append(value)
        return self.model.from_db(connection.alias, [field.attname for field, _, _ in self.fields], converted)


def model_columns(model, alias: str, names: tuple[str, ...] | None = None) -> ModelColumns:
    """`names` (attribute names) of `model`, every concrete field when None, read under table alias `alias`."""
    fields = model._meta.concrete_fields if names is None else [model._meta.get_field(name) for name in names]
    return ModelColumns(model, alias, tuple((field, field.get_col(alias), field.get_db_converters(connection))
                                            for field in fields))
