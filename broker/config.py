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

FSYNC_POLICIES = ("always", "interval", "never")


class ConfigError(ValueError):
    """A setting has a value brokerd cannot use.  The message names it."""


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 7700
    # HTTP on the same address: /metrics, /api/queues, /healthz, /readyz
    # (broker/http.py).  0 picks a free port.
    http_port: int = 7701
    # Extra names the web page answers to, comma-separated ("name" for any port, "name:port"),
    # besides the bound address, 127.0.0.1, localhost and [::1]: a browser request with any
    # other Host is refused, which stops DNS rebinding (broker/http.py, App.refusal).
    http_allowed_hosts: str = ""
    data_dir: str = "./brokerd-data"
    # The largest frame accepted, body included (see client.wire.DEFAULT_MAX_FRAME).
    max_frame: int = 16 * MiB
    # Each side sends a HEARTBEAT after this long without sending anything;
    # a peer silent for two intervals is dead (AMQP's rule).  0 turns it off.
    heartbeat: float = 30 * SECONDS
    # A connection whose unsent output passes this is not read from until it
    # drains (back-pressure); past four times this it is closed (SLOW_CONSUMER).
    output_buffer: int = 4 * MiB
    # A connection must finish HELLO this soon after connecting.
    handshake_timeout: float = 10 * SECONDS
    # Write-ahead log (broker.wal)
    fsync: str = "always"
    fsync_interval_ms: int = 1000
    segment_bytes: int = 64 * MiB
    repair: bool = False
    # How long a task result is kept after its last update (Celery: result_expires).
    result_ttl: float = 24 * 3600 * SECONDS
    log_level: str = "info"

    def validate(self) -> "Config":
        def bad(name, msg):
            raise ConfigError(f"{name}: {msg}")

        if not isinstance(self.host, str) or not self.host:
            bad("host", "must be an address such as 127.0.0.1")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            bad("port", f"must be a TCP port from 0 to 65535 (got {self.port!r})")
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
        if not isinstance(self.output_buffer, int) or self.output_buffer < 64 * KiB:
            bad("output_buffer", f"must be a number of bytes >= 65536 (got {self.output_buffer!r})")
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
        return self

    @classmethod
    def field_types(cls) -> dict[str, type]:
        return {f.name: type(f.default) for f in fields(cls)}

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def coerce(name: str, raw, typ: type):
    """A string (from the environment or argv) → the setting's type."""
    if isinstance(raw, typ) and not (typ is not bool and isinstance(raw, bool)):
        return raw
    if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not isinstance(raw, str):
        raise ConfigError(f"{name}: must be {typ.__name__} (got {raw!r})")
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
