"""Pools: where tasks run.  A slot runs one job at a time; the main loop hands jobs to idle slots.

* ``processes`` (``process.ProcessPool``, the default): forked children, pickles over socketpairs.
* ``threads`` (``thread.ThreadPool``): threads in the worker process, for I/O-bound tasks.
* ``trio`` (``trio.TrioPool``): ``async def`` tasks on one trio loop, ``def`` tasks in its threads.

Sizing and autoscale are one implementation (``base.Pool``).  A pool never imports the worker
runtime: it is handed its *host* (the worker) and calls only the host's public methods, listed in
``base.Pool``.
"""
