"""Celery itself on brokerd: a kombu transport (``brokerd://``, ``brokerds://``) and a result backend.

Install with ``pip install 'brokerd[celery]'``.  The result backend registers itself through Celery's
``celery.result_backends`` entry point (``result_backend = "brokerd://host:7700"``).  kombu 5.7 has no
entry point for transports (its URL schemes come from ``kombu.transport.TRANSPORT_ALIASES`` only), so
the broker side needs one line in the app module, before the app connects::

    import client.celery  # registers brokerd:// and brokerds:// with kombu

(or the setting ``broker_transport = "client.celery.transport:Transport"``).
"""

from kombu.transport import TRANSPORT_ALIASES

TRANSPORT = "client.celery.transport:Transport"

for _scheme in ("brokerd", "brokerds"):
    TRANSPORT_ALIASES.setdefault(_scheme, TRANSPORT)
