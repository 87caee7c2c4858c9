"""The runtime: the only trio code of brokerd.

``server`` (lifecycle, accept, ticker, effects), ``connection`` (the binary
protocol loop of one connection), ``admin_conn`` (the admin text loop and its
EVENTS stream), ``durability`` (the write-ahead log's writer task), ``http``
(metrics, probes, the web page; hypercorn on trio) and ``notify`` (systemd).
"""
