from celery import states  # noqa: F401
from celery._compat import missing

BaseKeyValueStoreBackend = missing("backends.base.BaseKeyValueStoreBackend")
BaseBackend = missing("backends.base.BaseBackend")
