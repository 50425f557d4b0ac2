from service.store.db import session_scope
from service.store.tables import Tenant


def test_schema(store_settings):
    with session_scope(store_settings.resolved_database_url) as s:
        s.add(Tenant(name="a"))
    with session_scope(store_settings.resolved_database_url) as s:
        assert s.query(Tenant).count() == 1
