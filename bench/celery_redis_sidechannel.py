"""A pytest plugin for bench/celery_integration.py's brokerd target: brokerd's result backend under a URL
that Celery's suite takes for "a Redis backend".

About 100 tests of Celery's ``t/integration`` skip unless ``app.conf.result_backend.startswith("redis")``.
Nearly all of them need no Redis *backend*: they use Redis as a side channel, through tasks that write
to it directly (``redis_echo``, ``redis_count``, reached at REDIS_HOST/REDIS_PORT, which the harness
gives every target), to see which callbacks and errbacks ran.  Under the URL
``redis-sidechannel-brokerd://host:port`` those tests run with brokerd as broker *and* backend; Redis
only holds their marks.  The few that read Redis's own backend keys (``backend.get_key_for_group``, its
pub/sub channels) then fail on brokerd, and the harness lists them as not applicable.

Loaded with ``-p celery_redis_sidechannel`` (bench/ on PYTHONPATH); nothing in the product knows
this scheme.
"""

from __future__ import annotations

from celery.app import backends

from client.celery.backend import BrokerdBackend

SCHEME = "redis-sidechannel-brokerd"


class SideChannelBrokerdBackend(BrokerdBackend):
    """brokerd's backend, reached at the ``brokerd://`` address the side-channel URL names."""

    def __init__(self, app, url=None, **kwargs):
        super().__init__(app, url=url, **kwargs)
        if self.url.startswith(SCHEME + "://"):
            self.url = "brokerd://" + self.url.split("://", 1)[1]


backends.BACKEND_ALIASES[SCHEME] = f"{__name__}:SideChannelBrokerdBackend"
