"""Errors the broker raises, each carrying a wire error code from ``client.wire``.

Named by whose fault it is (trio's ClosedResourceError vs BrokenResourceError):
``RequestError`` means the client asked for something wrong and can fix its
request; ``BrokerUnavailable`` means the broker cannot serve it right now.
"""

from client.wire import ERROR_CODES


class BrokerError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        assert self.code in ERROR_CODES, self.code
        self.message = message


class RequestError(BrokerError):
    """The request is wrong: bad field, unknown queue, stale tag... Fix the request."""

    code = "BAD_REQUEST"


class BrokerUnavailable(BrokerError):
    """The broker cannot accept this now (log failed, shutting down). Retry later."""

    code = "LOG_FAILED"
