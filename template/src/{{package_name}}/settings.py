"""Configuration: environment (and .env) over the generated defaults, validated once.

`load()` is the only constructor; nothing reads the environment at import time.
A bad value anywhere raises `ConfigError` naming every bad variable at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import unquote_plus, urlsplit

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    PostgresDsn,
    RedisDsn,
    UrlConstraints,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

_DEFAULTS = Path(str(files(__package__) / "defaults.toml"))
_METHOD = re.compile(r"/[A-Za-z_][A-Za-z0-9_.]*/[A-Za-z_][A-Za-z0-9_]*")
_NESTED = "__"
_SECRET_FIELDS = frozenset({"database_url", "redis_url"})
# Query parameters of a DSN that carry a password (libpq's names, which asyncpg reads).
_SECRET_QUERY_PARAMETERS = frozenset({"password", "sslpassword"})
_MASK = "***"

# A duration in seconds; finite, as inf and nan overflow wherever they are converted.
Seconds = Annotated[float, AllowInfNan(allow_inf_nan=False)]
# Any other number that must be finite (rates, factors).
Finite = Annotated[float, AllowInfNan(allow_inf_nan=False)]

# Bounds of the durations passed on as whole milliseconds, `int(seconds * 1000)`:
# PostgreSQL's timeouts and gRPC C-core's channel arguments are 32-bit ints of
# milliseconds, and a positive duration must not round down to 0 (which disables the
# timeout or means "at once").
MILLISECOND = 0.001
MAX_MILLISECONDS_IN_SECONDS = 2_147_483  # (2**31 - 1) ms, in whole seconds: 24.8 days
# A duration passed on as whole milliseconds.
MillisecondSeconds = Annotated[Seconds, Field(ge=MILLISECOND, le=MAX_MILLISECONDS_IN_SECONDS)]


def _zero_or_at_least_a_millisecond(value: float) -> float:
    if 0 < value < MILLISECOND:
        raise ValueError(f"must be 0 or at least {MILLISECOND} (one millisecond)")
    return value


# Only the schemes asyncpg connects with (PostgresDsn also allows `postgresql+psycopg`...).
AsyncpgDsn = Annotated[PostgresDsn, UrlConstraints(allowed_schemes=["postgres", "postgresql"])]


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
    statement_timeout: MillisecondSeconds = Field(
        30.0,
        description="Server-side backstop: PostgreSQL cancels longer statements.",
    )
    idle_in_transaction_session_timeout: MillisecondSeconds = Field(
        60.0,
        description="Server-side backstop: sessions idle in a transaction are ended.",
    )
    close_timeout: Seconds = Field(
        10.0, gt=0, description="Graceful pool close budget at shutdown; then connections are cut."
    )
    reset_session: bool = Field(
        default=False,
        description="Reset session state (RESET ALL, UNLISTEN *, CLOSE ALL, advisory locks) "
        "each time a connection returns to the pool: one more round trip per checkout. "
        "Turn on if your code uses SET without LOCAL, LISTEN, cursors WITH HOLD or "
        "session advisory locks.",
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
    # Channel arguments in milliseconds (server.py), hence the bounds.
    keepalive_time: MillisecondSeconds = Field(
        60.0,
        description="Server pings an idle connection this often.",
    )
    keepalive_timeout: MillisecondSeconds = Field(
        20.0,
        description="Ping ack wait before closing.",
    )
    min_client_ping_interval: MillisecondSeconds = Field(
        10.0,
        description="Clients may ping this often without a GOAWAY.",
    )
    max_connection_age: MillisecondSeconds = Field(
        300.0,
        description="Connections are recycled after this, so load rebalances.",
    )
    max_concurrent_streams: int = Field(
        100,
        ge=1,
        le=100_000,
        description="Streams one connection may have open at once (HTTP/2 "
        "SETTINGS_MAX_CONCURRENT_STREAMS); more wait in the client.",
    )
    max_pending_calls: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Calls grpc accepted that the service has not yet taken up; beyond "
        "this, grpc core refuses new calls, increasingly often, in C, before Python runs.",
    )
    max_connection_age_grace: Annotated[
        Seconds, AfterValidator(_zero_or_at_least_a_millisecond)
    ] = Field(
        30.0,
        ge=0,
        le=MAX_MILLISECONDS_IN_SECONDS,
        description="In-flight calls get this long when a connection is recycled.",
    )


class AdminSettings(_Group):
    """Admin HTTP server (`ADMIN__*`)."""

    host: str = Field("0.0.0.0", min_length=1, description="Listen address.")  # noqa: S104
    probe_interval: Seconds = Field(
        2.0, gt=0, le=60, description="How often dependencies are checked for readiness."
    )
    probe_timeout: Seconds = Field(1.0, gt=0, le=30, description="Timeout of one check.")


class MethodRate(_Group):
    """One method's rate limit: `per_second` sustained, bursts of up to `burst`."""

    per_second: Finite = Field(gt=0, le=100_000, description="Sustained calls per second.")
    burst: int = Field(ge=1, le=100_000, description="Calls allowed at once.")


class RateLimitSettings(_Group):
    """Rate limits (`RATE_LIMIT__*`): token buckets; an over-limit call is refused at once."""

    per_second: Finite = Field(
        0.0,
        ge=0,
        le=100_000,
        description="Default limit of every method, in calls per second (0: no default limit).",
    )
    burst: int = Field(100, ge=1, le=100_000, description="Calls allowed at once by that limit.")
    methods: dict[str, MethodRate | None] = Field(
        default_factory=dict,
        description='Per method (full name, "/pkg.Service/Method"): its own limit, or null '
        "for none. JSON.",
    )
    caller_header: str = Field(
        "",
        max_length=100,
        pattern="^[a-z0-9_.-]*$",
        description="Metadata key (HTTP header) naming the caller; empty: no per-caller limit.",
    )
    caller_per_second: Finite = Field(
        0.0, ge=0, le=100_000, description="Each caller's limit over all methods (0: none)."
    )
    caller_burst: int = Field(20, ge=1, le=100_000, description="Each caller's burst.")
    max_callers: int = Field(
        10_000, ge=1, le=1_000_000, description="Callers remembered; the least recent go first."
    )

    @model_validator(mode="after")
    def _methods_named(self) -> Self:
        bad = [m for m in self.methods if not _METHOD.fullmatch(m)]
        if bad:
            raise ValueError(
                f"RATE_LIMIT__METHODS keys must be full method names like "
                f"/pkg.v1.Service/Method (got {bad[0]!r})"
            )
        return self


class SheddingSettings(_Group):
    """Load shedding (`SHEDDING__*`): refuse at once what would only queue."""

    enabled: bool = Field(default=True, description="Shed load at all.")
    max_in_flight: int = Field(
        5000, ge=1, le=100_000, description="Hard cap on requests in flight."
    )
    deadline_fraction: Finite = Field(
        0.5,
        ge=0,
        le=1,
        description="Refuse a request whose expected wait exceeds this fraction of its "
        "remaining deadline (0: off).",
    )
    adaptive: bool = Field(
        default=False,
        description="A latency-gradient limit under the cap (latency over throughput).",
    )
    initial_limit: int = Field(20, ge=1, le=100_000, description="The adaptive limit at start.")
    min_limit: int = Field(4, ge=1, le=100_000, description="The adaptive limit's floor.")
    tolerance: Finite = Field(
        2.0, ge=1, le=10, description="Latency allowed, as a multiple of the no-load latency."
    )
    backoff: Finite = Field(
        0.8, ge=0.5, le=0.95, description="Factor applied to the limit on drops or loop lag."
    )
    lag_threshold: Seconds = Field(
        0.05, ge=0, le=1, description="Event-loop lag that cuts the limit (0: ignore lag)."
    )
    lag_interval: Seconds = Field(
        0.05, ge=0.005, le=1, description="How often the loop's lag is sampled."
    )
    probe_interval: Seconds = Field(
        30.0, ge=1, le=600, description="How often the no-load latency is measured again."
    )
    retry_after: Seconds = Field(
        0.1, gt=0, le=60, description="The retry delay a shed request is told to wait."
    )

    @model_validator(mode="after")
    def _limits(self) -> Self:
        if self.adaptive and not self.min_limit <= self.initial_limit <= self.max_in_flight:
            raise ValueError(
                "need SHEDDING__MIN_LIMIT <= SHEDDING__INITIAL_LIMIT <= SHEDDING__MAX_IN_FLIGHT "
                f"(got {self.min_limit}, {self.initial_limit}, {self.max_in_flight})"
            )
        return self


class RetrySettings(_Group):
    """Retries of transient failures of dependencies (`RETRY__*`), inside the deadline."""

    enabled: bool = Field(default=True, description="Retry at all.")
    max_attempts: int = Field(3, ge=1, le=10, description="Attempts per call, the first included.")
    initial_backoff: Seconds = Field(
        0.025, ge=0.001, le=10, description="Longest sleep before the first retry (full jitter)."
    )
    max_backoff: Seconds = Field(0.5, ge=0.001, le=60, description="Longest sleep between retries.")
    multiplier: Finite = Field(2.0, ge=1, le=10, description="Growth of the backoff per retry.")
    min_attempt_time: Seconds = Field(
        0.005,
        ge=0,
        le=10,
        description="No attempt starts with less than this left of the deadline.",
    )
    budget_ratio: Finite = Field(
        0.1, ge=0, le=1, description="Retries allowed as a fraction of calls over the window."
    )
    budget_per_second: Finite = Field(
        5.0, ge=0, le=10_000, description="Retries allowed per second on top of that."
    )
    budget_window: Seconds = Field(10.0, ge=1, le=600, description="The budget's sliding window.")

    @model_validator(mode="after")
    def _backoffs(self) -> Self:
        if self.initial_backoff > self.max_backoff:
            raise ValueError(
                f"RETRY__INITIAL_BACKOFF ({self.initial_backoff}) exceeds "
                f"RETRY__MAX_BACKOFF ({self.max_backoff})"
            )
        return self


class BreakerSettings(_Group):
    """Circuit breakers of dependencies (`BREAKER__*`): fail fast while one is down."""

    enabled: bool = Field(default=True, description="Use circuit breakers at all.")
    failures: int = Field(
        5, ge=1, le=1000, description="Consecutive failures that open a dependency's circuit."
    )
    open_for: Seconds = Field(
        5.0, ge=0.1, le=300, description="How long an open circuit refuses calls before a probe."
    )
    probes: int = Field(
        1, ge=1, le=100, description="Successful probes that close a half-open circuit."
    )


class LogSettings(_Group):
    """Logging (`LOG__*`)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = Field(
        "json", description="json for production, console for a terminal."
    )
    sample_ok: Finite = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of successful calls that get a request line (errors and slow "
        "calls always do).",
    )
    slow: Seconds = Field(
        1.0, gt=0, le=3600, description="A call this long or longer always gets its line."
    )


class MetricsSettings(_Group):
    """Prometheus metrics (`METRICS__*`), served at /metrics on the admin port."""

    enabled: bool = Field(default=True, description="Count and serve metrics at all.")


class TracingSettings(_Group):
    """OpenTelemetry traces (`TRACING__*`); on when an OTLP endpoint is set (`OTEL_*`)."""

    sample_ratio: Finite = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of requests without a sampled parent that are traced.",
    )
    shutdown_timeout: Seconds = Field(
        5.0, gt=0, le=60, description="Longest wait at exit for queued spans to be exported."
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
    database_url: AsyncpgDsn = Field(repr=False)
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
    rate_limit: RateLimitSettings = RateLimitSettings()
    shedding: SheddingSettings = SheddingSettings()
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()

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
        """Lowest priority: the defaults generated into defaults.toml.

        The environment and .env sources are replaced by ones that let a group variable
        that is not JSON (`DB=x`) through to validation, which then reports it along with
        every other problem; the stock sources raise SettingsError at the first one.
        """
        del env_settings, dotenv_settings
        defaults = TomlConfigSettingsSource(settings_cls, toml_file=_DEFAULTS)
        env = _EnvSource(settings_cls)
        dotenv = _DotEnvSource(settings_cls)
        return (init_settings, env, dotenv, file_secret_settings, defaults)


def _json_or_as_is(
    decode: Callable[[str, FieldInfo, object], object],
    field_name: str,
    field: FieldInfo,
    value: object,
) -> object:
    try:
        return decode(field_name, field, value)
    except ValueError:
        return value  # validation reports it: a group wants a JSON object


class _EnvSource(EnvSettingsSource):
    """Environment variables; a group variable that is not JSON goes on as it is."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: object) -> object:
        return _json_or_as_is(super().decode_complex_value, field_name, field, value)


class _DotEnvSource(DotEnvSettingsSource):
    """The .env file; a group variable that is not JSON goes on as it is."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: object) -> object:
        return _json_or_as_is(super().decode_complex_value, field_name, field, value)


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
    except SettingsError as exc:
        # A source failed before validation; it names the field, never the value.
        raise ConfigError([_describe_source_error(exc)]) from None


_GROUP_HINT = "must be a JSON object or unset; set single values as {0}__KEY"


def _describe_source_error(error: SettingsError) -> str:
    field = re.search(r'field "([^"]+)"', str(error))
    if field is None:
        return f"configuration: {error}"
    variable = field.group(1).upper()
    if field.group(1) in _groups():
        return f"{variable}: {_GROUP_HINT.format(variable)}"
    return f"{variable}: cannot be read ({error})"


def _groups() -> frozenset[str]:
    return frozenset(
        name
        for name, field in Settings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Group)
    )


def _describe(error: object) -> str:
    assert isinstance(error, dict)  # noqa: S101 - pydantic's ErrorDetails is a TypedDict
    loc = [str(part) for part in error.get("loc", ())]
    # A field's own validators report the field; model validators report no location.
    variable = _NESTED.join(loc[:2]).upper() if loc else "configuration"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if len(loc) == 1 and loc[0] in _groups() and error.get("type") == "model_type":
        message = _GROUP_HINT.format(variable)  # `DB=x`: a group variable that is not JSON
    shown = error.get("input")
    if loc and loc[0] not in _SECRET_FIELDS and not isinstance(shown, dict | type(None)):
        return f"{variable}: {message} (got {shown!r})"
    return f"{variable}: {message}"


def redact(url: object) -> str:
    """A DSN without its passwords (`user:***@`, `?password=***`), safe to log.

    Everything else is kept as written: the URL is cut where urlsplit cuts it (and
    asyncpg, which parses DSNs with urllib), not rebuilt.
    """
    text = str(url)
    password = urlsplit(text).password
    rest, hash_, fragment = text.partition("#")
    base, question, query = rest.partition("?")
    if password is not None:
        base = base.replace(f":{password}@", f":{_MASK}@", 1)
    if query:
        query = "&".join(_redact_parameter(parameter) for parameter in query.split("&"))
    return f"{base}{question}{query}{hash_}{fragment}"


def _redact_parameter(parameter: str) -> str:
    name, equals, _ = parameter.partition("=")
    if equals and unquote_plus(name).lower() in _SECRET_QUERY_PARAMETERS:
        return f"{name}={_MASK}"
    return parameter
