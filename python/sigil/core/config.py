"""Effective settings: defaults < ``config.yaml`` < environment < command line.

This is contract 9 of ARCHITECTURE.md. The file is ``<sigil home>/config.yaml``
with the keys of the spec's Appendix A (plus the ``provider``, ``errors``,
``export`` and ``pipeline`` sections the implementation needs). Every value is checked strictly
(``true`` is not a number, ``"10"`` is not an integer) because a setting that is
silently coerced or ignored is worse than one that stops the command: a bad value
raises :class:`ConfigError`, whose one-line message names the key and where it
came from; an unknown key only warns, so that an old sigil can read a newer file.

Each setting remembers its source (``default``, ``config``, ``env`` or ``cli``)
so that ``sigil config show`` can explain why a value is what it is.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "ErrorSettings",
    "ExportSettings",
    "LoggingSettings",
    "MonitoringSettings",
    "PipelineSettings",
    "PricingSettings",
    "ProviderSettings",
    "Settings",
    "Source",
    "TokenBudgetSettings",
    "config_file_path",
    "load_settings",
    "parse_ascii_int",
]

Source = Literal["default", "config", "env", "cli"]

CONFIG_FILE_NAME = "config.yaml"


class ConfigError(ValueError):
    """A setting with a wrong type or value, or a config file that cannot be read.

    A plain :class:`ValueError` (the settings load without click, so that
    ``sigil monitor`` can draw its first frame before click is imported). The
    command line shows it as a usage error: one line, ``Error: <message>``, exit
    2 (:func:`sigil.interfaces.cli.group.run` and the command group convert it),
    without each command having to catch it.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def format_message(self) -> str:
        """The one-line message (as :meth:`click.ClickException.format_message`)."""
        return self.message


def _home(env: Mapping[str, str]) -> Path:
    configured = env.get("SIGIL_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".sigil"


def config_file_path() -> Path:
    """``<sigil home>/config.yaml`` (``$SIGIL_HOME`` or ``~/.sigil``)."""
    return _home(os.environ) / CONFIG_FILE_NAME


def _default_log_path() -> str:
    return str(_home(os.environ) / "logs")


#: The budget the spec's allocations (6.3) are written for.
SPEC_BUDGET = 256_000
#: Spec 6.3: per-component allocations of the default 256K budget (the rest, 26K, is
#: reserve). For another budget they are scaled (see ``sigil.telemetry.tokens``);
#: here, in ``core``, so that config needs nothing from ``telemetry``.
DEFAULT_ALLOCATIONS: dict[str, int] = {
    "routing": 10_000,
    "memory": 30_000,
    "planning": 20_000,
    "reasoning": 150_000,
    "contracts": 10_000,
    "validation": 10_000,
}


def _default_allocations() -> dict[str, int]:
    return dict(DEFAULT_ALLOCATIONS)


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """``logging``: where the logs go and how the writer buffers, syncs and rotates them."""

    path: str = field(default_factory=_default_log_path)
    buffer_size_bytes: int = 1024
    flush_interval_seconds: float = 0.1
    max_batch_size: int = 100
    fsync: str = "interval"
    max_file_size_mb: float = 10
    retention_days: int = 7
    archive_retention_days: int = 30
    sanitize_logs: bool = True
    additional_patterns: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class MonitoringSettings:
    """``monitoring``: what ``sigil monitor`` shows, and how often."""

    default_mode: str = "dashboard"
    refresh_rate_hz: float = 10
    show_component_breakdown: bool = True
    show_budget_bar: bool = True
    show_forecast: bool = True
    show_latency: bool = True
    highlight_slowest: bool = True
    latency_warning_ms: float = 5000
    #: Run once per alert (a budget level crossed, a failed step), detached, with
    #: its message as the last argument and ``SIGIL_ALERT_LEVEL``,
    #: ``SIGIL_SESSION_ID`` and ``SIGIL_ALERT_MESSAGE`` in its environment.
    alert_command: str | None = None


@dataclass(frozen=True, slots=True)
class TokenBudgetSettings:
    """``token_budget``: the default budget, its allocations and warning thresholds."""

    default_total: int = 256_000
    allocations: dict[str, int] = field(default_factory=_default_allocations)
    warning_threshold: float = 0.5
    critical_threshold: float = 0.8
    exceeded_threshold: float = 0.95


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """``provider``: the model provider the pipeline calls."""

    name: str = "offline"
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class ErrorSettings:
    """``errors``: retries and their backoff."""

    max_retries: int = 3
    backoff_base: float = 1.0
    backoff_max: float = 30.0


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """``export``: where ``sigil export`` sends OTLP traces."""

    otlp_endpoint: str | None = None
    otlp_protocol: str = "http/protobuf"
    otlp_headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    """``pipeline``: replacement steps by slot."""

    # Step slot (routing, memory, ...) -> "module:attribute" of a replacement step;
    # the orchestrator checks the slots and imports the steps.
    steps: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PricingSettings:
    # Model name (exact) -> {"input_per_mtok": X, "output_per_mtok": Y}, US dollars per
    # million tokens; wins over genai-prices' table (sigil.telemetry.pricing).
    models: dict[str, dict[str, float]] = field(default_factory=dict)


_SECTIONS: dict[str, type[Any]] = {
    "logging": LoggingSettings,
    "monitoring": MonitoringSettings,
    "token_budget": TokenBudgetSettings,
    "provider": ProviderSettings,
    "errors": ErrorSettings,
    "export": ExportSettings,
    "pipeline": PipelineSettings,
    "pricing": PricingSettings,
}


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective settings, one frozen dataclass per section."""

    logging: LoggingSettings = field(default_factory=LoggingSettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    token_budget: TokenBudgetSettings = field(default_factory=TokenBudgetSettings)
    provider: ProviderSettings = field(default_factory=ProviderSettings)
    errors: ErrorSettings = field(default_factory=ErrorSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    pricing: PricingSettings = field(default_factory=PricingSettings)
    config_path: Path = field(default_factory=config_file_path)
    # Dotted key -> where its value came from; keys absent here are defaults.
    sources: Mapping[str, Source] = field(default_factory=dict)

    def source(self, key: str) -> Source:
        """Where the setting ``key`` (``"section.name"``) got its value."""
        section, _, name = key.partition(".")
        if name not in _SCHEMA.get(section, {}):
            raise KeyError(f"unknown setting {key!r}")
        return self.sources.get(key, "default")

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (lists and dicts copied), ready for JSON or YAML."""
        out: dict[str, dict[str, Any]] = {}
        for section, keys in _SCHEMA.items():
            values = getattr(self, section)
            out[section] = {key: _plain(getattr(values, key)) for key in keys}
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------
# Validation: each validator returns the (normalised) value or raises _Invalid.


class _Invalid(Exception):
    """A value's problem, phrased to follow "<where>: <key>: "."""


Validator = Callable[[Any], Any]


def _describe(value: Any) -> str:
    if isinstance(value, bool | int | float | str) or value is None:
        return repr(value)
    return f"a {type(value).__name__}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


#: Integers the native code stores in 64 bits.
_INT_MAX = (1 << 63) - 1


def _integer(minimum: int, maximum: int = _INT_MAX) -> Validator:
    def check(value: Any) -> int:
        if not _is_int(value) or not minimum <= value <= maximum:
            raise _Invalid(
                f"expected an integer from {minimum} to {maximum:,}, got {_describe(value)}"
            )
        return int(value)

    return check


def _is_finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _number(low: float, high: float, *, low_open: bool) -> Validator:
    """A finite number in ``(low, high]`` (``low_open``) or ``[low, high]``."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def check(value: Any) -> float:
        if (
            not _is_finite_number(value)
            or not (value > low if low_open else value >= low)
            or not value <= high
        ):
            raise _Invalid(f"expected a number in {shown}, got {_describe(value)}")
        return value  # type: ignore[no-any-return]

    return check


def _non_negative_number(value: Any) -> float:
    if not _is_finite_number(value) or not value >= 0:
        raise _Invalid(f"expected a finite number >= 0, got {_describe(value)}")
    return value  # type: ignore[no-any-return]


def _fraction(value: Any) -> float:
    if not _is_finite_number(value) or not 0 < value <= 1:
        raise _Invalid(f"expected a number in (0, 1], got {_describe(value)}")
    return value  # type: ignore[no-any-return]


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_describe(value)}")
    return value


def _choice(*options: str) -> Validator:
    def check(value: Any) -> str:
        if value not in options or not isinstance(value, str):
            shown = ", ".join(repr(o) for o in options)
            raise _Invalid(f"expected one of {shown}, got {_describe(value)}")
        return value

    return check


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"expected a non-empty string, got {_describe(value)}")
    return value


def _path(value: Any) -> str:
    return str(Path(_text(value)).expanduser())


def _url(value: Any) -> str:
    text = _text(value)
    try:  # urllib raises on what it cannot split: ``http://[::1``, ``http://[zz]:80``
        parsed = urllib.parse.urlsplit(text)
    except ValueError as exc:
        raise _Invalid(f"expected an http:// or https:// URL, got {text!r} ({exc})") from None
    try:  # and on a port out of range only when asked for it
        parsed.port  # noqa: B018
    except ValueError as exc:
        raise _Invalid(f"bad port in {text!r} ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise _Invalid(f"expected an http:// or https:// URL, got {text!r}")
    return text


def _optional_command(value: Any) -> str | None:
    """A command line split like a shell's words (no shell runs it), or None."""
    if value is None:
        return None
    text = _text(value)
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise _Invalid(f"expected a command line, got {text!r} ({exc})") from None
    if not words:
        raise _Invalid(f"expected a command line, got {text!r}")
    return text


def _optional_url(value: Any) -> str | None:
    return None if value is None else _url(value)


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not _ENV_NAME_RE.fullmatch(value):
        raise _Invalid(f"expected an environment variable name, got {_describe(value)}")
    return value


def _allocations(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise _Invalid(f"expected a mapping of component to tokens, got {_describe(value)}")
    out: dict[str, int] = {}
    for component, tokens in value.items():
        if not isinstance(component, str) or not component:
            raise _Invalid(f"component names must be strings, got {_describe(component)}")
        if not _is_int(tokens) or tokens < 0:
            raise _Invalid(f"{component}: expected an integer >= 0, got {_describe(tokens)}")
        out[component] = tokens
    return out


def _string_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _Invalid(f"expected a mapping of strings to strings, got {_describe(value)}")
    return dict(value)


def _patterns(value: Any) -> list[tuple[str, str]]:
    """``[[pattern, replacement], ...]`` or ``[{pattern: ..., replacement: ...}, ...]``."""
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of [pattern, replacement] pairs, got {_describe(value)}")
    out: list[tuple[str, str]] = []
    for index, item in enumerate(value):
        if isinstance(item, dict) and set(item) == {"pattern", "replacement"}:
            pair = (item["pattern"], item["replacement"])
        elif isinstance(item, list) and len(item) == 2:
            pair = (item[0], item[1])
        else:
            raise _Invalid(f"item {index}: expected [pattern, replacement], got {_describe(item)}")
        if not all(isinstance(part, str) for part in pair) or not pair[0]:
            raise _Invalid(f"item {index}: pattern and replacement must be strings")
        try:
            re.compile(pair[0])
        except re.error as exc:
            raise _Invalid(f"item {index}: invalid regular expression {pair[0]!r}: {exc}") from None
        out.append(pair)
    return out


_PRICE_KEYS = ("input_per_mtok", "output_per_mtok")


def _model_prices(value: Any) -> dict[str, dict[str, float]]:
    """``{model: {input_per_mtok: X, output_per_mtok: Y}}``: dollars per million tokens."""
    if not isinstance(value, dict):
        raise _Invalid(
            "expected a mapping of model name to {input_per_mtok, output_per_mtok},"
            f" got {_describe(value)}"
        )
    out: dict[str, dict[str, float]] = {}
    for model, price in value.items():
        if not isinstance(model, str) or not model.strip():
            raise _Invalid(f"model names must be non-empty strings, got {_describe(model)}")
        if not isinstance(price, dict):
            raise _Invalid(
                f"{model}: expected {{input_per_mtok: X, output_per_mtok: Y}},"
                f" got {_describe(price)}"
            )
        unknown = sorted(str(k) for k in price if k not in _PRICE_KEYS)
        if unknown:
            raise _Invalid(
                f"{model}: unknown key {unknown[0]!r} (expected input_per_mtok, output_per_mtok)"
            )
        for key in _PRICE_KEYS:
            if key not in price:
                raise _Invalid(f"{model}: {key} is missing (US dollars per million tokens)")
            number = price[key]
            # Bounded so that a call's cost stays far below what a double holds
            # to the nano-dollar (sigil.telemetry.pricing.cost_number).
            if not _is_finite_number(number) or not 0 <= number <= 1_000_000:
                raise _Invalid(
                    f"{model}: {key}: expected US dollars per million tokens from 0 to"
                    f" 1,000,000, got {_describe(number)}"
                )
        out[model] = {key: price[key] for key in _PRICE_KEYS}
    return out


_SCHEMA: dict[str, dict[str, Validator]] = {
    "logging": {
        "path": _path,
        # The writer holds at most 8 MiB in memory (its bound on what it keeps).
        "buffer_size_bytes": _integer(1, 8 << 20),
        # The native writer's own bound (rust/lib.rs AppendWriter): checked here so a
        # wrong value is a config error before anything is written, not a failed run.
        "flush_interval_seconds": _number(0, 3600, low_open=True),
        "max_batch_size": _integer(1),
        "fsync": _choice("interval", "always", "never"),
        "max_file_size_mb": _number(0, 1 << 20, low_open=True),
        "retention_days": _integer(0),
        "archive_retention_days": _integer(0),
        "sanitize_logs": _boolean,
        "additional_patterns": _patterns,
    },
    "monitoring": {
        "default_mode": _choice("dashboard", "stream", "minimal", "json"),
        "refresh_rate_hz": _number(0, 1000, low_open=True),
        "show_component_breakdown": _boolean,
        "show_budget_bar": _boolean,
        "show_forecast": _boolean,
        "show_latency": _boolean,
        "highlight_slowest": _boolean,
        "latency_warning_ms": _non_negative_number,
        "alert_command": _optional_command,
    },
    "token_budget": {
        "default_total": _integer(1),
        "allocations": _allocations,
        "warning_threshold": _fraction,
        "critical_threshold": _fraction,
        "exceeded_threshold": _fraction,
    },
    "provider": {
        "name": _choice("offline", "openai"),
        "base_url": _url,
        "model": _text,
        "api_key_env": _env_name,
        "timeout_seconds": _number(0, 86_400, low_open=True),
    },
    "errors": {
        "max_retries": _integer(0),
        "backoff_base": _number(0, 86_400, low_open=False),
        "backoff_max": _number(0, 86_400, low_open=False),
    },
    "export": {
        "otlp_endpoint": _optional_url,
        "otlp_protocol": _choice("http/protobuf", "http/json", "grpc"),
        "otlp_headers": _string_map,
    },
    "pipeline": {
        "steps": _string_map,
    },
    "pricing": {
        "models": _model_prices,
    },
}


# ---------------------------------------------------------------------------
# Environment variables: their text is parsed, then validated like any value.


#: An integer as a user types one: ASCII digits (``int()`` also takes Arabic-Indic
#: or full-width digits, which no one means as a budget), optional sign and ``_``.
_ASCII_INT_RE = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*")


def parse_ascii_int(text: str) -> int | None:
    """``text`` as an integer written in ASCII digits, or None."""
    text = text.strip()
    return int(text) if _ASCII_INT_RE.fullmatch(text) else None


def _parse_int(text: str) -> int:
    value = parse_ascii_int(text)
    if value is None:
        raise _Invalid(f"expected an integer in ASCII digits, got {text!r}")
    return value


def _parse_otlp_headers(text: str) -> dict[str, str]:
    # The OpenTelemetry format: comma-separated key=value, values percent-encoded.
    headers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _Invalid(f"expected key=value pairs separated by commas, got {item!r}")
        headers[urllib.parse.unquote(key.strip())] = urllib.parse.unquote(value.strip())
    return headers


def _as_is(text: str) -> str:
    return text


# (variable names, first set wins) -> (dotted key, parser)
_ENVIRONMENT: list[tuple[tuple[str, ...], str, Callable[[str], Any]]] = [
    (("SIGIL_LOG_PATH",), "logging.path", _as_is),
    (("SIGIL_FSYNC",), "logging.fsync", _as_is),
    (("SIGIL_MONITOR_MODE",), "monitoring.default_mode", _as_is),
    (("SIGIL_ALERT_COMMAND",), "monitoring.alert_command", _as_is),
    (("SIGIL_BUDGET",), "token_budget.default_total", _parse_int),
    (("SIGIL_PROVIDER",), "provider.name", _as_is),
    (("SIGIL_MODEL",), "provider.model", _as_is),
    (("SIGIL_BASE_URL", "OPENAI_BASE_URL"), "provider.base_url", _as_is),
    # The per-signal variables (traces) win over the general ones, as in the OTel SDKs.
    (
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        "export.otlp_endpoint",
        _as_is,
    ),
    (
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        "export.otlp_protocol",
        _as_is,
    ),
    (
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
        "export.otlp_headers",
        _parse_otlp_headers,
    ),
]

ENVIRONMENT_VARIABLES: dict[str, str] = {names[0]: key for names, key, _ in _ENVIRONMENT}


# ---------------------------------------------------------------------------
# Loading.


def load_settings(
    overrides: Mapping[str, object] | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults, the config file, the environment and ``overrides``.

    ``overrides`` holds command-line values by dotted key
    (``{"token_budget.default_total": 1000}``); a ``None`` value means the flag
    was not given and is skipped, so commands can pass their options straight
    through. ``path`` defaults to :func:`config_file_path` and ``env`` to
    ``os.environ``; a missing file means "all defaults".
    """
    env = os.environ if env is None else env
    config_path = Path(path).expanduser() if path else _home(env) / CONFIG_FILE_NAME
    values: dict[str, dict[str, Any]] = {section: {} for section in _SCHEMA}
    # The default log path follows the home of *this* environment, not os.environ's.
    values["logging"]["path"] = str(_home(env) / "logs")
    sources: dict[str, Source] = {}
    where: dict[str, str] = {}

    def assign(key: str, raw: Any, source: Source, origin: str, text: str | None = None) -> None:
        section, _, name = key.partition(".")
        try:
            values[section][name] = _SCHEMA[section][name](raw)
        except _Invalid as exc:
            if text is not None and (line := _key_line(text, section, name)) is not None:
                origin = f"{origin}:{line}"
            raise ConfigError(f"{origin}: {key}: {exc}") from None
        sources[key] = source
        where[key] = origin

    text = _read_text(config_path)
    for key, raw in _config_items(config_path, text):
        assign(key, raw, "config", str(config_path), text)

    for names, key, parse in _ENVIRONMENT:
        var = next((name for name in names if env.get(name)), None)
        if var is None:
            continue
        origin = f"environment variable {var}"
        try:
            parsed = parse(env[var])
        except _Invalid as exc:
            raise ConfigError(f"{origin}: {key}: {exc}") from None
        assign(key, parsed, "env", origin)

    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        section, _, name = key.partition(".")
        if name not in _SCHEMA.get(section, {}):
            raise ConfigError(f"command line: unknown setting {key!r}")
        assign(key, raw, "cli", "command line")

    merged = {section: _SECTIONS[section](**fields) for section, fields in values.items()}
    settings = Settings(**merged, config_path=config_path, sources=dict(sources))
    _check_consistency(settings, where)
    return settings


def _check_consistency(settings: Settings, where: Mapping[str, str]) -> None:
    """Rules across keys; the error names the key set closest to the user."""
    budget = settings.token_budget
    pairs = [
        (
            "warning_threshold",
            budget.warning_threshold,
            "critical_threshold",
            budget.critical_threshold,
        ),
        (
            "critical_threshold",
            budget.critical_threshold,
            "exceeded_threshold",
            budget.exceeded_threshold,
        ),
    ]
    for low_name, low, high_name, high in pairs:
        if low >= high:
            key = _closest(settings, f"token_budget.{low_name}", f"token_budget.{high_name}")
            raise ConfigError(
                f"{where.get(key, 'defaults')}: {key}: token_budget.{low_name} ({low}) must be"
                f" below token_budget.{high_name} ({high})"
            )
    if settings.source("token_budget.allocations") != "default":
        # Allocations written by the user are absolute: they must fit the budget.
        key = "token_budget.allocations"
        check_allocations(settings, budget.default_total, "token_budget.default_total",
                          where.get(key, "defaults"))  # fmt: skip
    errors = settings.errors
    if errors.backoff_base > errors.backoff_max:
        key = _closest(settings, "errors.backoff_base", "errors.backoff_max")
        raise ConfigError(
            f"{where.get(key, 'defaults')}: {key}: errors.backoff_base ({errors.backoff_base})"
            f" must not exceed errors.backoff_max ({errors.backoff_max})"
        )


def check_allocations(settings: Settings, budget: int, budget_name: str, origin: str) -> None:
    """Raise :class:`ConfigError` when configured allocations exceed ``budget``.

    Default allocations are proportions, scaled to any budget, so only
    allocations the user wrote (absolute numbers) can be too large.
    """
    if settings.source("token_budget.allocations") == "default":
        return
    total = sum(settings.token_budget.allocations.values())
    if total > budget:
        raise ConfigError(
            f"{origin}: token_budget.allocations: the allocations add up to {total:,} tokens,"
            f" more than the session budget of {budget:,} ({budget_name})"
        )


_PRECEDENCE: dict[Source, int] = {"default": 0, "config": 1, "env": 2, "cli": 3}


def _closest(settings: Settings, *keys: str) -> str:
    return max(keys, key=lambda k: _PRECEDENCE[settings.source(k)])


#: The largest config file read. Appendix A's file is a few hundred bytes; the
#: bound keeps a hostile path (a symlink to /dev/zero, a huge file) from eating memory.
MAX_CONFIG_BYTES = 1 << 20


def _read_text(config_path: Path) -> str | None:
    """The config file's text, or None when there is none.

    Only a regular file is read (a symlink to one is fine: dotfile managers use
    them). The open is non-blocking so that a FIFO planted at the path is
    refused instead of waited on forever, and the size is bounded.
    """
    import stat

    try:
        fd = os.open(config_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot read the config file: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{config_path}: not a regular file (sigil reads config from one)")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{config_path}: too large ({info.st_size:,} bytes; the limit is "
                f"{MAX_CONFIG_BYTES:,})"
            )
        data = os.read(fd, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot read the config file: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:  # grew while being read
        raise ConfigError(f"{config_path}: too large (the limit is {MAX_CONFIG_BYTES:,} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config_path}: not UTF-8 text ({exc.reason})") from None


def _config_items(config_path: Path, text: str | None) -> list[tuple[str, Any]]:
    """The file's known ``(dotted key, value)`` pairs; unknown keys are warned about."""
    if text is None:
        return []
    import yaml  # only when there is a config file to read (start-up cost ~10 ms)

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{config_path}{position}: invalid YAML: {problem}") from None
    except RecursionError:
        # The YAML reader recurses once per level: a file nested ~1,000 deep
        # exhausts the stack before it is read.
        raise ConfigError(f"{config_path}: invalid YAML: nested too deeply to read") from None
    if document is None:
        return []
    if not isinstance(document, dict):
        raise ConfigError(
            f"{config_path}: expected a mapping of sections (logging, monitoring, ...),"
            f" got {_describe(document)}"
        )
    items: list[tuple[str, Any]] = []
    for section, body in document.items():
        if section not in _SCHEMA:
            _warn_unknown(config_path, None, str(section), list(_SCHEMA))
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(
                f"{config_path}: {section}: expected a mapping, got {_describe(body)}"
            )
        for name, value in body.items():
            key = f"{section}.{name}"
            if name not in _SCHEMA[section]:
                _warn_unknown(config_path, section, str(name), list(_SCHEMA[section]))
                continue
            items.append((key, value))
    return items


def _warn_unknown(config_path: Path, section: str | None, name: str, known: list[str]) -> None:
    prefix = f"{section}." if section else ""
    import difflib  # only for a typo's suggestion

    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {prefix}{close[0]!s}?)" if close else ""
    print(
        f"sigil: warning: {config_path}: unknown setting {prefix}{name} ignored{hint}",
        file=sys.stderr,
    )


def _key_line(text: str, section: str, name: str) -> int | None:
    """1-based line of ``section.name`` in the YAML text, for error messages only."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return None
    node: Any = root
    for wanted in (section, name):
        if not isinstance(node, yaml.MappingNode):
            return None
        found = next(((k, v) for k, v in node.value if getattr(k, "value", None) == wanted), None)
        if found is None:
            return None
        key_node, node = found
    return int(key_node.start_mark.line) + 1
