"""Every default, unit and limit of brokerd in one place.

Values come, lowest precedence first, from these defaults, an optional TOML
file (``--config``), ``BROKERD_*`` environment variables, and command-line
flags.  ``Config.validate()`` names the setting and what is wrong with it.
Imports nothing from the project.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, fields

SECONDS = 1.0
BYTES = 1
KiB = 1024 * BYTES
MiB = 1024 * KiB
GiB = 1024 * MiB

FSYNC_POLICIES = ("always", "interval", "never")

# -- connection and memory bounds ----------------------------------------------------------
# Descriptors kept back from connections: the log's segments and directory, the
# data-dir lock, the listeners, HTTP's clients, stdio, the resolver and trio's
# own wakeup fds.  Generous on purpose: EMFILE in the log fails it for good.
FD_RESERVE = 128
# The automatic max_connections never goes above this: each connection costs
# ~20-50 KiB of Python and socket buffers; 10,000 of them is already ~0.5 GiB.
MAX_CONNECTIONS_AUTO = 10_000
# The default memory watermark: this share of the machine's or cgroup's memory.
MEMORY_DEFAULT_FRACTION = 0.4
# The hard limit (publishes refused) is this many times max_memory (the spill watermark)
# unless max_memory_hard says otherwise: room for what spilling cannot take out of memory
# (objects of messages with headers, delays or TTLs; results; buffers) to settle.
MEMORY_HARD_RATIO = 1.25
# Byte settings take these suffixes (powers of 1024): 512M, 2G.
SIZE_SUFFIXES = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
BYTE_SETTINGS = ("max_memory", "max_memory_hard", "spill_body_bytes")
# The watermark clears when RSS falls below this share of max_memory again
# (hysteresis, so publishers are not flipped on and off at every sample).
MEMORY_CLEAR_RATIO = 0.9


def fd_limit() -> int:
    """This process's soft RLIMIT_NOFILE (1024 when it cannot be read)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1024
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def max_connections_for(limit: int) -> int:
    """The automatic max_connections for a descriptor limit (at least 16)."""
    return max(16, min(MAX_CONNECTIONS_AUTO, limit - FD_RESERVE))


def physical_memory() -> int:
    """Bytes of memory this process may use: RAM, or a smaller cgroup v2 limit; 0 if unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 0
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            raw = fh.read().strip()
        if raw.isdigit() and (not total or int(raw) < total):
            total = int(raw)
    except OSError:
        pass
    return total


# Config.http_port's "not set" value: the HTTP port is then port + 1 (0 when port is 0).
HTTP_PORT_FOLLOWS = -1


# The Lease --election kubernetes uses when the URL names none.
KUBE_LEASE_NAME = "brokerd-leader"


# -- the election URL (broker/runtime/election.py) --------------------------------------
def parse_election(text: str) -> tuple:
    """``("etcd", [(host, port), ...], prefix)`` or ``("kubernetes", lease_name)``; ValueError with
    what is wrong and an example otherwise (Config.validate names the setting)."""
    if text == "kubernetes" or text.startswith("kubernetes:"):
        name = text.partition(":")[2] or KUBE_LEASE_NAME
        # a Kubernetes object name: DNS-1123 subdomain (lower-case alphanumerics, '-', '.')
        if len(name) > 253 or not all(c.isalnum() and not c.isupper() or c in "-." for c in name) \
                or not name[0].isalnum() or not name[-1].isalnum():
            raise ValueError(f"the Lease name {name!r} is not a Kubernetes object name (lower-case letters, "
                             "digits, '-' and '.'), e.g. kubernetes:brokerd-leader")
        return ("kubernetes", name)
    if not text.startswith("etcd://"):
        raise ValueError(f"must be etcd://HOST:PORT/PREFIX (e.g. etcd://10.0.0.9:2379/brokerd) or kubernetes "
                         f"(got {text!r})")
    rest = text[len("etcd://"):]
    hosts, slash, prefix = rest.partition("/")
    if not slash or not prefix.strip("/"):
        raise ValueError(f"names no key prefix after the address, e.g. etcd://10.0.0.9:2379/brokerd (got {text!r})")
    if any(c.isspace() for c in prefix) or len(prefix) > 512:
        raise ValueError(f"the key prefix must be at most 512 characters without spaces (got {prefix!r})")
    endpoints = []
    for hp in hosts.split(","):
        host, sep, port = hp.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{hp!r} is not HOST:PORT (e.g. etcd://10.0.0.9:2379/brokerd)")
        endpoints.append((host.strip("[]"), int(port)))
    return ("etcd", endpoints, "/" + prefix.strip("/"))


class ConfigError(ValueError):
    """A setting has a value brokerd cannot use.  The message names it."""


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 7700
    # HTTP on the same address: /metrics, /api/queues, /healthz, /readyz
    # (broker/runtime/http.py).  0 picks a free port.  Unset (HTTP_PORT_FOLLOWS) it is
    # port + 1, and 0 when port is 0, so a second brokerd on a host moves both ports by
    # changing --port alone (the default pair stays 7700/7701).
    http_port: int = -1
    # Extra names the web page answers to, comma-separated ("name" for any port, "name:port"),
    # besides the bound address, 127.0.0.1, localhost and [::1]: a browser request with any
    # other Host is refused, which stops DNS rebinding (broker/runtime/http.py, App.refusal).
    http_allowed_hosts: str = ""
    # With users: /metrics and /api/queues answer without a login, for a Prometheus or KEDA
    # that holds no token.  Off by default: queue names and depths are the broker's business.
    # Without users every HTTP route is open anyway (broker/runtime/http.py, App._guarded).
    http_open_metrics: bool = False
    data_dir: str = "./brokerd-data"
    # The largest frame accepted, body included (see client.wire.DEFAULT_MAX_FRAME).
    max_frame: int = 16 * MiB
    # Each side sends a HEARTBEAT after this long without sending anything;
    # a peer silent for two intervals is dead (AMQP's rule).  0 turns it off.
    heartbeat: float = 30 * SECONDS
    # A connection whose unsent output passes this is not read from until it
    # drains (back-pressure); past four times this it is closed (SLOW_CONSUMER).
    output_buffer: int = 4 * MiB
    # A connection must finish HELLO this soon after connecting; an admin text
    # line, once its first byte has arrived, must be whole this soon too (so a
    # client trickling one byte at a time cannot hold a connection forever).
    handshake_timeout: float = 10 * SECONDS
    # A connection from which nothing arrives for this long is closed
    # (IDLE_TIMEOUT): admin text connections, and binary connections that
    # turned heartbeats off.  A binary client asking for a heartbeat longer
    # than half of this is given half of this.  Bounds what idle sockets cost.
    idle_timeout: float = 300 * SECONDS
    # Open connections (binary and admin text together); past it new ones are
    # refused with TOO_MANY_CONNECTIONS.  0: automatic, the smaller of
    # MAX_CONNECTIONS_AUTO and the process's descriptor limit minus FD_RESERVE
    # (see max_connections_for), so sockets can never starve the log of fds.
    max_connections: int = 0
    # With users: open connections one user may hold; past it its new ones are refused with
    # TOO_MANY_CONNECTIONS, so one leaked token cannot take every slot.  0: no per-user limit.
    max_connections_per_user: int = 1000
    # All partial (not yet whole) input frames held across every connection;
    # past it the connections holding the largest ones are closed
    # (INPUT_LIMIT).  At least max_frame, so one largest frame always fits.
    max_input_buffer: int = 128 * MiB
    # Resident memory (RSS) past which PUBLISH, RESULT_SET (without a delivery
    # tag), SCHEDULE_PUT and CHORD get MEMORY_LIMIT, until it falls below
    # MEMORY_CLEAR_RATIO of this.  Default: 40 % of the machine's (or the
    # cgroup's) memory, as RabbitMQ's vm_memory_high_watermark.  0 turns it off.
    max_memory: int = -1
    # Past max_memory the bodies of queued messages are left in the log (spilled) and read
    # back at delivery; past this hard limit publishes get MEMORY_LIMIT as above.
    # 0 (default): max_memory x MEMORY_HARD_RATIO.  Bytes; K/M/G suffixes accepted.
    max_memory_hard: int = 0
    # Queued bodies of at least this many bytes are left in the log once written, whatever
    # the memory: they cost memory for nothing while they wait, and one read of the log
    # brings back a block of them at delivery.  64 KiB: far above a typical task's
    # arguments (so the common path never reads the log), far below what a 1,000,000-deep
    # backlog of them could hold in RAM.  0 turns it off.
    spill_body_bytes: int = 64 * KiB
    # Write-ahead log (broker.wal)
    fsync: str = "always"
    fsync_interval_ms: int = 1000
    segment_bytes: int = 64 * MiB
    repair: bool = False
    # How long a task result is kept after its last update (Celery: result_expires).
    result_ttl: float = 24 * 3600 * SECONDS
    log_level: str = "info"
    # -- TLS and the protected default (protocol.md §2, "TLS") --------------------------------
    # PEM files: the server's certificate chain and its private key.  Both or neither.  With
    # them the protocol port also accepts TLS (told apart by its first byte, 0x16) and the
    # HTTP port serves HTTPS only.
    tls_cert: str = ""
    tls_key: str = ""
    # PEM file of the CA(s) whose client certificates are accepted: mutual TLS.  A TLS client
    # without a certificate signed by one of them fails the handshake.
    tls_client_ca: str = ""
    # Refuse plaintext binary and admin text on the protocol port (TLS_REQUIRED).
    tls_required: bool = False
    # brokerd has no users yet: listening on a non-loopback address lets anyone who can
    # reach the port do anything, so it refuses to start there unless told this explicitly.
    insecure_no_auth: bool = False
    # TOML file of users, their token hashes and grants (broker.auth; brokerd-ctl user add writes
    # it).  Empty: no users, every client may do everything (bind to loopback only).  Set: every
    # connection must log in, and each request is checked against its user's grants.
    users_file: str = ""
    # -- replication (broker/runtime/replication.py, protocol.md §5.40) ------------------------
    # HOST:PORT of the leader: this brokerd is then a follower (a hot standby that refuses
    # writes with NOT_LEADER).  Empty: a leader (or a standalone brokerd).
    follow: str = ""
    # The replication user and token the follower logs in with when the leader has users
    # (the user needs the "replicate" grant).  Put the token in BROKERD_FOLLOW_TOKEN.
    follow_user: str = ""
    follow_token: str = ""
    # On a leader: followers that must have a record on disk before its confirm goes out.
    # 0 confirms after the local fsync alone; N > 0 refuses publishes with NOT_ENOUGH_REPLICAS
    # while fewer than N are in sync.  Unset (-1): 1 with --election (a group has followers by
    # design, so a confirm means two disks, as a quorum queue's majority of three), else 0 (a
    # lone brokerd, or one a follower may or may not join, is not told it has followers).
    sync_replicas: int = -1
    # -- election (broker/runtime/election.py) ------------------------------------------------
    # Who leads is decided by an existing engine: etcd://HOST:PORT[,HOST:PORT...]/PREFIX (an etcd
    # lease) or kubernetes[:LEASE-NAME] (a coordination.k8s.io Lease in the pod's namespace).
    # Empty: no election (a leader, or a follower by --follow).
    election: str = ""
    # HOST:PORT clients and followers reach this brokerd at, written to the election when it
    # leads.  Empty: host:port as it listens (which must then be reachable by the others).
    advertise: str = ""
    # Seconds the leader's lease lasts without a renewal: after a leader dies, the others wait this
    # long (at most) to elect another.  Short: faster failover; long: a slow engine or a paused
    # process deposes a healthy leader less often.
    election_ttl: int = 5

    def __post_init__(self):
        # Resolved here, not in load(): a Config built directly (tests, embedders) follows too.
        if self.http_port == HTTP_PORT_FOLLOWS and isinstance(self.port, int):
            object.__setattr__(self, "http_port", self.port + 1 if self.port else 0)

    def validate(self) -> "Config":
        def bad(name, msg):
            raise ConfigError(f"{name}: {msg}")

        if not isinstance(self.host, str) or not self.host:
            bad("host", "must be an address such as 127.0.0.1")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            bad("port", f"must be a TCP port from 0 to 65535 (got {self.port!r})")
        if self.http_port == 65536 and self.port == 65535:
            bad("http_port", "follows port as port + 1, and port is 65535: set http_port (--http-port) explicitly")
        if not isinstance(self.http_port, int) or not 0 <= self.http_port <= 65535:
            bad("http_port", f"must be a TCP port from 0 to 65535 (got {self.http_port!r})")
        for entry in self.http_allowed_hosts.split(","):
            if entry.strip() and (any(c.isspace() or c in "/@?#" for c in entry.strip()) or entry.strip().startswith(":")):
                bad("http_allowed_hosts", f"must be host names or host:port, comma-separated (got {entry.strip()!r})")
        if self.http_port == self.port and self.port != 0:
            bad("http_port", f"must differ from port ({self.port}): the protocol and HTTP each need their own")
        if not isinstance(self.max_frame, int) or self.max_frame < 1 * KiB:
            bad("max_frame", f"must be a number of bytes >= 1024 (got {self.max_frame!r})")
        if not isinstance(self.heartbeat, (int, float)) or self.heartbeat < 0:
            bad("heartbeat", f"must be a number of seconds >= 0 (got {self.heartbeat!r})")
        if not isinstance(self.handshake_timeout, (int, float)) or not 0 < self.handshake_timeout < 3600:
            bad("handshake_timeout", f"must be a number of seconds from 0 to 3600 (got {self.handshake_timeout!r})")
        if not isinstance(self.idle_timeout, (int, float)) or not 0 < self.idle_timeout <= 7 * 24 * 3600:
            bad("idle_timeout", f"must be a number of seconds > 0 and at most 604800 (a week) (got {self.idle_timeout!r})")
        if not isinstance(self.max_connections_per_user, int) or self.max_connections_per_user < 0:
            bad("max_connections_per_user", f"must be a whole number >= 0; 0 means no per-user limit (got {self.max_connections_per_user!r})")
        if not isinstance(self.max_connections, int) or self.max_connections < 0:
            bad("max_connections", f"must be a whole number >= 0; 0 picks one from the fd limit (got {self.max_connections!r})")
        if not isinstance(self.max_input_buffer, int) or self.max_input_buffer < self.max_frame:
            bad("max_input_buffer", f"must be a number of bytes >= max_frame ({self.max_frame}) (got {self.max_input_buffer!r})")
        if not isinstance(self.max_memory, int) or self.max_memory < -1:
            bad("max_memory", f"must be a number of bytes, or 0 to turn the watermark off (got {self.max_memory!r})")
        if not isinstance(self.max_memory_hard, int) or self.max_memory_hard < 0:
            bad("max_memory_hard", f"must be a number of bytes, or 0 for max_memory x {MEMORY_HARD_RATIO:g} (got {self.max_memory_hard!r})")
        if self.max_memory_hard and self.max_memory > 0 and self.max_memory_hard < self.max_memory:
            bad("max_memory_hard", f"must be at least max_memory ({self.max_memory}): spilling starts at max_memory, "
                f"refusing at max_memory_hard (got {self.max_memory_hard})")
        if not isinstance(self.spill_body_bytes, int) or self.spill_body_bytes < 0:
            bad("spill_body_bytes", f"must be a number of bytes, or 0 to keep every body in memory (got {self.spill_body_bytes!r})")
        if not isinstance(self.output_buffer, int) or self.output_buffer < 64 * KiB:
            bad("output_buffer", f"must be a number of bytes >= 65536 (got {self.output_buffer!r})")
        if self.follow:
            host, sep, port = self.follow.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                bad("follow", f"must be the leader's HOST:PORT, e.g. 10.0.0.5:7700 (got {self.follow!r})")
        if isinstance(self.sync_replicas, bool) or not isinstance(self.sync_replicas, int) or not -1 <= self.sync_replicas <= 16:
            bad("sync_replicas", f"must be a number of followers from 0 to 16, or -1 for the default (got {self.sync_replicas!r})")
        if self.sync_replicas == -1:  # unset: see the field's comment
            object.__setattr__(self, "sync_replicas", 1 if self.election else 0)
        if self.election:
            try:
                parse_election(self.election)
            except ValueError as exc:
                bad("election", str(exc))
            if self.follow:
                bad("follow", "with --election the election decides whom to follow: drop --follow")
            if not self.advertise and self.host in ("0.0.0.0", "::"):
                bad("advertise", f"with --election and --host {self.host}, give the HOST:PORT the other brokers "
                    "reach this one at (--advertise brokerd-0.brokerd-headless:7700)")
        if self.advertise:
            host, sep, port = self.advertise.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
                bad("advertise", f"must be the HOST:PORT others reach this brokerd at, e.g. 10.0.0.5:7700 "
                    f"(got {self.advertise!r})")
        if isinstance(self.election_ttl, bool) or not isinstance(self.election_ttl, int) or not 2 <= self.election_ttl <= 60:
            bad("election_ttl", f"must be a whole number of seconds from 2 to 60 (got {self.election_ttl!r})")
        if self.fsync not in FSYNC_POLICIES:
            bad("fsync", f"must be one of {', '.join(FSYNC_POLICIES)} (got {self.fsync!r})")
        if not isinstance(self.fsync_interval_ms, int) or self.fsync_interval_ms < 1:
            bad("fsync_interval_ms", f"must be a whole number of milliseconds >= 1 (got {self.fsync_interval_ms!r})")
        if not isinstance(self.segment_bytes, int) or self.segment_bytes < 64 * KiB:
            bad("segment_bytes", f"must be a number of bytes >= 65536 (got {self.segment_bytes!r})")
        if not isinstance(self.result_ttl, (int, float)) or self.result_ttl <= 0:
            bad("result_ttl", f"must be a number of seconds > 0 (got {self.result_ttl!r})")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            bad("log_level", f"must be one of debug, info, warning, error (got {self.log_level!r})")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                bad("host", f"must be an IP address such as 127.0.0.1 or 0.0.0.0 (got {self.host!r})")
        if bool(self.tls_cert) != bool(self.tls_key):
            bad("tls_cert" if not self.tls_cert else "tls_key",
                "--tls-cert and --tls-key go together: give both PEM files or neither")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                bad(name, f"file {path!r} does not exist or is not a file")
        if self.tls_client_ca and not self.tls_cert:
            bad("tls_client_ca", "mutual TLS needs the server's own --tls-cert and --tls-key too")
        if self.tls_required and not self.tls_cert:
            bad("tls_required", "needs --tls-cert and --tls-key (there is no TLS to require without them)")
        return self

    @property
    def tls(self) -> bool:
        """TLS is configured (certificate and key given)."""
        return bool(self.tls_cert)

    def is_loopback(self) -> bool:
        """``host`` reaches only this machine (127.0.0.0/8, ::1, localhost)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def security(self) -> str:
        """How clients are let in, as STATS shows it: ``users`` (every connection logs in),
        ``loopback`` (no users, only this machine can connect) or ``insecure-no-auth`` (no
        users, on a network by request)."""
        if self.users_file:
            return "users"
        return "loopback" if self.is_loopback() else "insecure-no-auth"

    def exposure_refusal(self) -> str | None:
        """Why brokerd must not start with these settings, or None.  Without users a
        non-loopback address would let anyone who reaches it publish, consume, purge and
        forge results; users (``users_file``) or an explicit ``insecure_no_auth`` lift that."""
        if self.users_file or self.is_loopback() or self.insecure_no_auth:
            return None
        return (
            f"refusing to listen on {self.host}: brokerd has no users configured, so anyone "
            "who can reach this address could publish tasks, read every result, purge queues and "
            "control workers. Add users (brokerd-ctl user add NAME --users-file FILE, then "
            "--users-file FILE), or listen on 127.0.0.1 (the default), or, on a network you trust "
            "completely, pass --insecure-no-auth (BROKERD_INSECURE_NO_AUTH=1) to start anyway"
        )

    def connection_limit(self) -> int:
        """``max_connections``, or when 0 the automatic figure for this process."""
        return self.max_connections or max_connections_for(fd_limit())

    def memory_limit(self) -> int:
        """``max_memory`` in bytes (0: off); -1 (the default) is resolved here."""
        if self.max_memory >= 0:
            return self.max_memory
        total = physical_memory()
        return int(total * MEMORY_DEFAULT_FRACTION) if total else 0

    def memory_hard_limit(self) -> int:
        """Resident bytes past which publishes are refused (0: off): ``max_memory_hard``, or
        ``memory_limit() x MEMORY_HARD_RATIO``."""
        soft = self.memory_limit()
        if self.max_memory_hard:
            return self.max_memory_hard
        return int(soft * MEMORY_HARD_RATIO)

    @classmethod
    def field_types(cls) -> dict[str, type]:
        return {f.name: type(f.default) for f in fields(cls)}

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def parse_bytes(name: str, raw: str) -> int:
    """``"2G"`` -> 2147483648: a whole number of bytes, or one with a K, M, G or T suffix."""
    text = raw.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if text[-1:] in SIZE_SUFFIXES:
        mult = SIZE_SUFFIXES[text[-1]]
        text = text[:-1]
    if text.lstrip("-").isdigit():
        return int(text) * mult
    raise ConfigError(f"{name}: {raw!r} is not a number of bytes (write e.g. 1048576, 512M or 2G)")


def coerce(name: str, raw, typ: type):
    """A string (from the environment or argv) → the setting's type."""
    if isinstance(raw, typ) and not (typ is not bool and isinstance(raw, bool)):
        return raw
    if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not isinstance(raw, str):
        raise ConfigError(f"{name}: must be {typ.__name__} (got {raw!r})")
    if typ is int and name.lstrip("-").replace("-", "_").lower().removeprefix("brokerd_") in BYTE_SETTINGS:
        return parse_bytes(name, raw)
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        return typ(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a valid {typ.__name__}") from None


def load(file: str | None = None, env=None, overrides: dict | None = None) -> Config:
    """Defaults < TOML file < BROKERD_* environment < overrides (flags)."""
    env = os.environ if env is None else env
    types = Config.field_types()
    values: dict = {}
    if file:
        try:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {file!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file!r} is not valid TOML: {exc}") from None
        for key, val in data.items():
            name = key.replace("-", "_")
            if name not in types:
                raise ConfigError(f"config file {file!r}: unknown setting {key!r}; known: {', '.join(types)}")
            values[name] = coerce(name, val, types[name])
    for name, typ in types.items():
        raw = env.get("BROKERD_" + name.upper())
        if raw is not None:
            values[name] = coerce("BROKERD_" + name.upper(), raw, typ)
    for name, val in (overrides or {}).items():
        if val is not None:
            values[name] = coerce("--" + name.replace("_", "-"), val, types[name])
    return Config(**values).validate()
