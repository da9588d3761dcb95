from django.db import connection


def prepared_cursor():
    """A cursor of the default database whose statements are bound and prepared on the server
    (`base.PreparedCursor`) on PostgreSQL; elsewhere Django's own cursor."""
    prepared = getattr(connection, "prepared_cursor", None)
    return connection.cursor() if prepared is None else prepared()
