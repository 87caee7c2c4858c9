"""``brokerd``: argv, environment and config file → Config → run the server.

Exit codes (named so scripts and systemd can tell them apart):
  0 EXIT_OK        stopped cleanly (SIGTERM/SIGINT)
  2 EXIT_USAGE     a flag, environment variable or config value is wrong
  3 EXIT_DATA      the data directory is locked, unreadable or its log is corrupt
  4 EXIT_NETWORK   the address cannot be bound (in use, not ours)
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys

import trio

from broker import __version__
from broker.boot import DataDirError, UsersFileError, open_server
from broker.runtime import election
from broker.runtime.server import server_tls_context
from broker.config import (
    FD_RESERVE,
    MAX_CONNECTIONS_AUTO,
    MEMORY_CLEAR_RATIO,
    MEMORY_DEFAULT_FRACTION,
    MEMORY_HARD_RATIO,
    Config,
    ConfigError,
    load,
)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_NETWORK = 4

log = logging.getLogger("brokerd")


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="brokerd",
        description="brokerd: a task-queue broker. Every flag can also be set as BROKERD_<NAME> "
        "in the environment or as <name> in a TOML file given with --config.",
    )
    p.add_argument("--version", action="version", version=f"brokerd {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML file of settings (flags and BROKERD_* override it)")
    p.add_argument("--host", help=f"address to listen on (default {d.host})")
    p.add_argument("--port", help=f"TCP port for the protocol and admin text (default {d.port}; 0 picks a free one)")
    p.add_argument("--http-port", dest="http_port", help=f"TCP port for HTTP: /metrics, /api/queues, /healthz, /readyz (default --port + 1, so {d.http_port}; 0 picks a free one)")
    p.add_argument("--data-dir", dest="data_dir", help=f"directory for the write-ahead log (default {d.data_dir})")
    p.add_argument("--max-frame", dest="max_frame", help=f"largest frame in bytes (default {d.max_frame})")
    p.add_argument("--heartbeat", help=f"seconds between heartbeats; 0 turns them off (default {d.heartbeat:g})")
    p.add_argument("--handshake-timeout", dest="handshake_timeout", help=f"seconds a new connection has to send its preamble and HELLO (default {d.handshake_timeout:g})")
    p.add_argument("--idle-timeout", dest="idle_timeout", help=f"seconds of silence after which an admin text connection, or a binary one without heartbeats, is closed (default {d.idle_timeout:g})")
    p.add_argument("--max-connections-per-user", dest="max_connections_per_user", help=f"with users: open connections one user may hold (default {d.max_connections_per_user}; 0: no limit)")
    p.add_argument("--max-connections", dest="max_connections", help=f"open connections before new ones are refused with TOO_MANY_CONNECTIONS (default 0: min({MAX_CONNECTIONS_AUTO}, the fd limit minus {FD_RESERVE}))")
    p.add_argument("--max-input-buffer", dest="max_input_buffer", help=f"bytes of partial frames held across all connections; past it the largest are closed with INPUT_LIMIT (default {d.max_input_buffer}; at least --max-frame)")
    p.add_argument("--max-memory", dest="max_memory", help=f"resident bytes (K/M/G suffixes) past which queued bodies are left in the log and read back at delivery; 0 turns the watermark off (default {MEMORY_DEFAULT_FRACTION * 100:g}%% of the machine's memory)")
    p.add_argument("--max-memory-hard", dest="max_memory_hard", help=f"resident bytes past which publishes get MEMORY_LIMIT until memory falls {100 - MEMORY_CLEAR_RATIO * 100:g}%% below it (default 0: --max-memory x {MEMORY_HARD_RATIO:g})")
    p.add_argument("--spill-body-bytes", dest="spill_body_bytes", help=f"queued bodies this large or larger are left in the log once written, at any memory (default {d.spill_body_bytes}; 0: never)")
    p.add_argument("--output-buffer", dest="output_buffer", help=f"bytes of unsent output per connection before back-pressure (default {d.output_buffer})")
    p.add_argument("--fsync", help=f"when to fsync the log: always, interval or never (default {d.fsync})")
    p.add_argument("--fsync-interval-ms", dest="fsync_interval_ms", help=f"with --fsync interval, milliseconds between fsyncs (default {d.fsync_interval_ms})")
    p.add_argument("--segment-bytes", dest="segment_bytes", help=f"log segment size before rotation (default {d.segment_bytes})")
    p.add_argument("--repair", action="store_const", const="true", help="drop only the parts of a damaged log that cannot be read (keeps every later valid record) and list what was dropped")
    p.add_argument("--result-ttl", dest="result_ttl", help=f"seconds a task result is kept (default {d.result_ttl:g})")
    p.add_argument("--tls-cert", dest="tls_cert", metavar="PEM", help="server certificate (chain): the protocol port then also accepts TLS, and HTTP serves HTTPS")
    p.add_argument("--tls-key", dest="tls_key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--tls-client-ca", dest="tls_client_ca", metavar="PEM", help="mutual TLS: accept only TLS clients with a certificate signed by this CA")
    p.add_argument("--tls-required", dest="tls_required", action="store_const", const="true", help="refuse plaintext on the protocol port (TLS_REQUIRED)")
    p.add_argument("--insecure-no-auth", dest="insecure_no_auth", action="store_const", const="true", help="listen on a non-loopback --host although brokerd has no authentication: anyone who reaches the port can do anything")
    p.add_argument("--users-file", dest="users_file", help="TOML file of users and their grants; set, every connection must log in (brokerd-ctl user add writes it)")
    p.add_argument("--follow", dest="follow", metavar="HOST:PORT", help="be a follower (hot standby) of the leader brokerd at HOST:PORT: copy its log, answer reads, refuse writes with NOT_LEADER")
    p.add_argument("--follow-user", dest="follow_user", help="with --follow: the user (with the replicate grant) to log in to the leader as; its token in BROKERD_FOLLOW_TOKEN")
    p.add_argument("--sync-replicas", dest="sync_replicas", help="on a leader: followers that must have fsynced a record before it is confirmed (default: 1 with --election, else 0: the local fsync alone)")
    p.add_argument("--election", help="decide who leads by an existing engine: etcd://HOST:PORT/PREFIX (an etcd lease) or kubernetes (a Lease in the pod's namespace); brokerd starts fenced and leads or follows as elected")
    p.add_argument("--advertise", metavar="HOST:PORT", help="with --election: the address clients and followers reach this brokerd at (default --host:--port)")
    p.add_argument("--election-ttl", dest="election_ttl", help=f"with --election: seconds the leader's lease lasts without renewal; the longest a dead leader goes unreplaced (default {d.election_ttl})")
    p.add_argument("--log-level", dest="log_level", help=f"debug, info, warning or error (default {d.log_level})")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    try:
        config = load(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"brokerd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:  # a certificate or key that cannot be loaded is a usage error, named before the data dir is opened
        server_tls_context(config)
    except (ssl.SSLError, OSError) as exc:
        print(f"brokerd: tls_cert/tls_key/tls_client_ca: cannot load them: {exc}", file=sys.stderr)
        return EXIT_USAGE
    refusal = config.exposure_refusal()
    if refusal is not None:
        log.error("%s", refusal)
        return EXIT_USAGE
    if not config.is_loopback():
        log.warning(
            "listening on %s with --insecure-no-auth: brokerd has no authentication, so anyone who can "
            "reach this address can publish, consume, purge, read results and control workers", config.host,
        )
    raise_fd_limit()
    try:
        return trio.run(run, config)
    except KeyboardInterrupt:
        return EXIT_OK


async def run(config: Config) -> int:
    try:
        server = open_server(config)
    except DataDirError as exc:
        log.error("%s", exc)
        return EXIT_DATA
    except UsersFileError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    elector = None  # with --election: the cancel scope of broker.runtime.election's task
    if config.election:
        if getattr(server, "roles", None) is None:
            log.error("election: this brokerd has no replication roles to promote or fence (server.roles)")
            return EXIT_USAGE
    try:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(server.serve)
            except OSError as exc:  # exc.filename names the HTTP address when that one failed
                where = exc.filename or f"{config.host}:{config.port}"
                log.error("cannot listen on %s: %s", where, exc.strerror or exc)
                return EXIT_NETWORK
            if config.election:
                # no write before the election says this brokerd leads: fenced with no checkpoint of
                # ours since the listeners opened (no client has finished a handshake yet)
                server.roles.fence("starting: waiting for the election")
                try:
                    elector = await nursery.start(election.run_election, server, config)
                except election.EngineError as exc:
                    log.error("election: %s", exc)
                    await server.stop()
                    return EXIT_USAGE
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    if elector is not None:
                        elector.cancel()  # a leader fences and hands its lease on before the listeners close
                    await server.stop()
                    break
    finally:
        pass
    log.info("brokerd stopped")
    return EXIT_OK


def raise_fd_limit() -> None:
    """Lift the soft descriptor limit to the hard one (as Go's runtime does).

    The soft limit is often 1024 while the hard one is far higher; the
    automatic max_connections is computed from the soft limit afterwards.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20), hard))
    except (ImportError, OSError, ValueError) as exc:
        log.debug("could not raise the descriptor limit: %s", exc)
