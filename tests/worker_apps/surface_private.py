"""An exception only the worker imports (tests/worker/test_surface.py checks the caller never does)."""


class PrivateError(Exception):
    pass
