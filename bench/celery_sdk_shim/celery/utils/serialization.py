from celery._compat import missing_exception

# the SDK rebuilds a task's exception as its own class, or a RemoteError subclass named after it: never this
UnpickleableExceptionWrapper = missing_exception("utils.serialization.UnpickleableExceptionWrapper")
