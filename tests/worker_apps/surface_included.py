"""A module named in an app's ``include``: the caller may import it to rebuild an exception class."""


class IncludedError(Exception):
    pass
