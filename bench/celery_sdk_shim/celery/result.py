from client.result import AsyncResult, GroupResult  # noqa: F401

from celery._compat import sdk

ResultSet = sdk("result", "ResultSet", "result.ResultSet")
EagerResult = sdk("result", "EagerResult", "result.EagerResult")
