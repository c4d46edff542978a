"""Configuration: environment (and .env) over the generated defaults, validated once.

`load()` is the only constructor; nothing reads the environment at import time.
A bad value anywhere raises `ConfigError` naming every bad variable at once.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PostgresDsn,
    RedisDsn,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_DEFAULTS = Path(str(files(__package__) / "defaults.toml"))
_NESTED = "__"
_SECRET_FIELDS = frozenset({"database_url", "redis_url"})

Seconds = float


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatabaseSettings(_Group):
    """asyncpg pool (`DB__*`)."""

    min_size: int = Field(2, ge=0, le=500, description="Connections opened at start and kept.")
    max_size: int = Field(10, ge=1, le=500, description="Upper bound on open connections.")
    acquire_timeout: Seconds = Field(
        2.0, gt=0, le=60, description="Longest wait for a free connection (deadlines cut it)."
    )
    connect_timeout: Seconds = Field(5.0, gt=0, le=60, description="Timeout of one connect.")
    max_inactive_connection_lifetime: Seconds = Field(
        300.0, ge=0, description="Idle connections older than this are closed (0 keeps them)."
    )
    statement_timeout: Seconds = Field(
        30.0, gt=0, description="Server-side backstop: PostgreSQL cancels longer statements."
    )
    idle_in_transaction_session_timeout: Seconds = Field(
        60.0, gt=0, description="Server-side backstop: sessions idle in a transaction are ended."
    )
    close_timeout: Seconds = Field(
        10.0, gt=0, description="Graceful pool close budget at shutdown; then connections are cut."
    )

    @model_validator(mode="after")
    def _sizes(self) -> Self:
        if self.min_size > self.max_size:
            raise ValueError(
                f"DB__MIN_SIZE ({self.min_size}) exceeds DB__MAX_SIZE ({self.max_size})"
            )
        return self


class DeadlineSettings(_Group):
    """Request deadlines (`DEADLINE__*`)."""

    default: Seconds = Field(5.0, gt=0, description="Deadline of a request that sets none.")
    maximum: Seconds = Field(30.0, gt=0, description="Longer client deadlines are cut to this.")
    hop_margin: Seconds = Field(
        0.02, ge=0, le=1, description="Subtracted from the budget passed to each downstream call."
    )

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.default > self.maximum:
            raise ValueError(
                f"DEADLINE__DEFAULT ({self.default}) exceeds DEADLINE__MAXIMUM ({self.maximum})"
            )
        return self


class ShutdownSettings(_Group):
    """Graceful shutdown (`SHUTDOWN__*`); the Kubernetes grace period derives from these."""

    drain: Seconds = Field(
        5.0, ge=0, le=300, description="Time to keep serving after readiness turns off."
    )
    grace: Seconds = Field(
        10.0, ge=0, le=300, description="Time in-flight requests get once listeners stop."
    )


class GrpcSettings(_Group):
    """gRPC server (`GRPC__*`)."""

    host: str = Field("[::]", min_length=1, description="Listen address.")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=1024**3, description="Largest message sent or received."
    )
    reflection: bool = Field(default=True, description="Serve grpc.reflection (service discovery).")
    reuse_port: bool = Field(
        default=False,
        description="SO_REUSEPORT: lets a second process share the port. Off by default.",
    )
    keepalive_time: Seconds = Field(
        60.0, gt=0, description="Server pings an idle connection this often."
    )
    keepalive_timeout: Seconds = Field(20.0, gt=0, description="Ping ack wait before closing.")
    min_client_ping_interval: Seconds = Field(
        10.0, gt=0, description="Clients may ping this often without a GOAWAY."
    )
    max_connection_age: Seconds = Field(
        300.0, gt=0, description="Connections are recycled after this, so load rebalances."
    )
    max_connection_age_grace: Seconds = Field(
        30.0, ge=0, description="In-flight calls get this long when a connection is recycled."
    )


class AdminSettings(_Group):
    """Admin HTTP server (`ADMIN__*`)."""

    host: str = Field("0.0.0.0", min_length=1, description="Listen address.")  # noqa: S104
    probe_interval: Seconds = Field(
        2.0, gt=0, le=60, description="How often dependencies are checked for readiness."
    )
    probe_timeout: Seconds = Field(1.0, gt=0, le=30, description="Timeout of one check.")


class LogSettings(_Group):
    """Logging (`LOG__*`)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = Field(
        "json", description="json for production, console for a terminal."
    )


class Settings(BaseSettings):
    """All configuration. Essentials have conventional flat names; groups use `GROUP__KEY`."""

    model_config = SettingsConfigDict(
        env_nested_delimiter=_NESTED,
        env_file=".env",
        extra="ignore",
        frozen=True,
        validate_default=True,
    )

    service_name: str = Field(min_length=1)
    # repr=False: a DSN may hold a password; keep it out of reprs and tracebacks.
    database_url: PostgresDsn = Field(repr=False)
    redis_url: RedisDsn | None = Field(default=None, repr=False)
    grpc_port: int = Field(ge=1, le=65535)
    http_port: int = Field(ge=1, le=65535)
    admin_port: int = Field(ge=1, le=65535)
    gateway_enabled: bool = True

    db: DatabaseSettings = DatabaseSettings()
    deadline: DeadlineSettings = DeadlineSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    grpc: GrpcSettings = GrpcSettings()
    admin: AdminSettings = AdminSettings()
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _distinct_ports(self) -> Self:
        ports = {"GRPC_PORT": self.grpc_port, "ADMIN_PORT": self.admin_port}
        if self.gateway_enabled:
            ports["HTTP_PORT"] = self.http_port
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                raise ValueError(f"{name} and {seen[port]} are both {port}; ports must differ")
            seen[port] = name
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Lowest priority: the defaults generated into defaults.toml."""
        defaults = TomlConfigSettingsSource(settings_cls, toml_file=_DEFAULTS)
        return (init_settings, env_settings, dotenv_settings, file_secret_settings, defaults)


class ConfigError(Exception):
    """Invalid configuration; `problems` holds one line per bad variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


def load() -> Settings:
    """Read and validate the configuration, or raise ConfigError naming every problem."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError([_describe(error) for error in exc.errors()]) from None


def _describe(error: object) -> str:
    assert isinstance(error, dict)  # noqa: S101 - pydantic's ErrorDetails is a TypedDict
    loc = [str(part) for part in error.get("loc", ())]
    # A field's own validators report the field; model validators report no location.
    variable = _NESTED.join(loc[:2]).upper() if loc else "configuration"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    shown = error.get("input")
    if loc and loc[0] not in _SECRET_FIELDS and not isinstance(shown, dict | type(None)):
        return f"{variable}: {message} (got {shown!r})"
    return f"{variable}: {message}"


def redact(url: object) -> str:
    """A DSN without its password, safe to log."""
    parts = urlsplit(str(url))
    if parts.password is None:
        return str(url)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
