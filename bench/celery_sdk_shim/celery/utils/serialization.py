from celery._compat import missing

UnpickleableExceptionWrapper = missing("utils.serialization.UnpickleableExceptionWrapper")
