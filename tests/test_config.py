"""Settings: Appendix A defaults, contract 9 precedence, strict validation, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest

from sigil.core.config import ConfigError, Settings, config_file_path, load_settings


def write_config(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load(home: Path, overrides: dict[str, object] | None = None, **env: str) -> Settings:
    return load_settings(overrides, env={"SIGIL_HOME": str(home), **env})


def test_defaults_follow_appendix_a(tmp_path: Path) -> None:
    settings = load(tmp_path / "home")
    assert settings.logging.path == str(tmp_path / "home" / "logs")
    assert settings.logging.flush_interval_seconds == 0.1
    assert settings.logging.max_batch_size == 100
    assert settings.logging.fsync == "interval"
    assert (settings.logging.max_file_size_mb, settings.logging.retention_days) == (10, 7)
    assert settings.logging.archive_retention_days == 30
    assert settings.logging.sanitize_logs is True
    assert settings.monitoring.default_mode == "dashboard"
    assert settings.monitoring.refresh_rate_hz == 10
    assert settings.monitoring.latency_warning_ms == 5000
    assert settings.token_budget.default_total == 256_000
    assert sum(settings.token_budget.allocations.values()) == 230_000  # + 26,000 reserve
    assert settings.token_budget.allocations["reasoning"] == 150_000
    thresholds = settings.token_budget
    assert (thresholds.warning_threshold, thresholds.critical_threshold) == (0.5, 0.8)
    assert thresholds.exceeded_threshold == 0.95
    assert settings.provider.name == "offline"
    assert settings.export.otlp_endpoint is None
    assert settings.source("logging.fsync") == "default"
    assert settings.config_path == tmp_path / "home" / "config.yaml"


def test_config_file_values_and_tilde_expansion(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_config(
        home,
        """
logging:
  path: ~/somewhere/logs
  fsync: always
  max_file_size_mb: 0.5
  additional_patterns:
    - ["internal-[0-9]+", "***INTERNAL***"]
    - {pattern: "acct=\\\\d+", replacement: "acct=***"}
monitoring:
  refresh_rate_hz: 4
pipeline:
  steps: {planning: "my_steps:SlowPlanning"}
token_budget:
  allocations: {reasoning: 1000, routing: 10}
""",
    )
    settings = load(home)
    assert settings.logging.path == str(Path("~/somewhere/logs").expanduser())
    assert not settings.logging.path.startswith("~")
    assert settings.logging.fsync == "always"
    assert settings.logging.max_file_size_mb == 0.5
    assert settings.logging.additional_patterns == [
        ("internal-[0-9]+", "***INTERNAL***"),
        ("acct=\\d+", "acct=***"),
    ]
    assert settings.monitoring.refresh_rate_hz == 4
    assert settings.pipeline.steps == {"planning": "my_steps:SlowPlanning"}
    assert settings.token_budget.allocations == {"reasoning": 1000, "routing": 10}
    assert settings.source("logging.fsync") == "config"
    assert settings.source("logging.retention_days") == "default"


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_config(home, "token_budget:\n  default_total: 1000\nlogging:\n  fsync: never\n")
    from_file = load(home)
    assert from_file.token_budget.default_total == 1000
    assert from_file.source("token_budget.default_total") == "config"

    from_env = load(home, SIGIL_BUDGET="2000", SIGIL_FSYNC="always")
    assert from_env.token_budget.default_total == 2000
    assert from_env.source("token_budget.default_total") == "env"
    assert from_env.logging.fsync == "always"

    from_cli = load(home, {"token_budget.default_total": 3000}, SIGIL_BUDGET="2000")
    assert from_cli.token_budget.default_total == 3000
    assert from_cli.source("token_budget.default_total") == "cli"
    assert from_cli.source("logging.fsync") == "config"


def test_override_none_means_flag_not_given(tmp_path: Path) -> None:
    settings = load(tmp_path, {"logging.path": None}, SIGIL_LOG_PATH=str(tmp_path / "env-logs"))
    assert settings.logging.path == str(tmp_path / "env-logs")
    assert settings.source("logging.path") == "env"


def test_environment_variables(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        SIGIL_PROVIDER="openai",
        SIGIL_MODEL="gpt-4.1",
        OPENAI_BASE_URL="http://localhost:8080/v1",
        SIGIL_MONITOR_MODE="stream",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318",
        OTEL_EXPORTER_OTLP_HEADERS="api-key=abc%3D%3D, x-team = blue",
    )
    assert settings.provider.name == "openai"
    assert settings.provider.model == "gpt-4.1"
    assert settings.provider.base_url == "http://localhost:8080/v1"
    assert settings.monitoring.default_mode == "stream"
    assert settings.export.otlp_endpoint == "http://collector:4318"
    assert settings.export.otlp_headers == {"api-key": "abc==", "x-team": "blue"}
    both = load(
        tmp_path, SIGIL_BASE_URL="https://a.example/v1", OPENAI_BASE_URL="https://b.example/v1"
    )
    assert both.provider.base_url == "https://a.example/v1"


def test_sigil_home_moves_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGIL_HOME", str(tmp_path / "elsewhere"))
    assert config_file_path() == tmp_path / "elsewhere" / "config.yaml"
    write_config(tmp_path / "elsewhere", "logging:\n  retention_days: 3\n")
    assert load_settings().logging.retention_days == 3


def test_explicit_path_argument(tmp_path: Path) -> None:
    path = write_config(tmp_path / "custom", "logging:\n  retention_days: 2\n")
    assert load_settings(path=path, env={}).logging.retention_days == 2


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("logging:\n  buffer_size_bytes: true\n", "logging.buffer_size_bytes"),  # bool is no int
        ("logging:\n  buffer_size_bytes: '1024'\n", "logging.buffer_size_bytes"),
        ("logging:\n  retention_days: 1.5\n", "logging.retention_days"),
        ("logging:\n  retention_days: -1\n", "logging.retention_days"),
        ("logging:\n  flush_interval_seconds: yes\n", "logging.flush_interval_seconds"),
        ("logging:\n  flush_interval_seconds: 0\n", "logging.flush_interval_seconds"),
        ("logging:\n  fsync: sometimes\n", "logging.fsync"),
        ("logging:\n  sanitize_logs: 'yes'\n", "logging.sanitize_logs"),
        ("logging:\n  sanitize_logs: 1\n", "logging.sanitize_logs"),
        ("logging:\n  path: ''\n", "logging.path"),
        ("logging:\n  additional_patterns: ['(unclosed', 'x']\n", "logging.additional_patterns"),
        ("logging:\n  additional_patterns: [['(unclosed', 'x']]\n", "logging.additional_patterns"),
        ("monitoring:\n  default_mode: fancy\n", "monitoring.default_mode"),
        ("monitoring:\n  show_forecast: null\n", "monitoring.show_forecast"),
        ("token_budget:\n  default_total: 0\n", "token_budget.default_total"),
        ("token_budget:\n  allocations: {reasoning: lots}\n", "token_budget.allocations"),
        ("token_budget:\n  allocations: [1, 2]\n", "token_budget.allocations"),
        ("token_budget:\n  warning_threshold: 1.5\n", "token_budget.warning_threshold"),
        ("token_budget:\n  critical_threshold: 0.4\n", "token_budget.critical_threshold"),
        ("provider:\n  name: acme\n", "provider.name"),
        ("provider:\n  base_url: ftp://x\n", "provider.base_url"),
        ("provider:\n  api_key_env: 'not a name'\n", "provider.api_key_env"),
        ("errors:\n  backoff_base: 60\n", "errors.backoff_base"),
        ("export:\n  otlp_headers: {a: 1}\n", "export.otlp_headers"),
        ("pipeline:\n  steps: [orchestrate_steps]\n", "pipeline.steps"),
    ],
)
def test_wrong_type_or_value_names_key_and_file(tmp_path: Path, yaml_text: str, key: str) -> None:
    path = write_config(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    message = str(caught.value)
    assert key in message
    assert str(path) in message
    assert "\n" not in message


def test_error_gives_the_line_number(tmp_path: Path) -> None:
    write_config(tmp_path, "# settings\nlogging:\n  retention_days: 7\n  fsync: maybe\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:4: logging\.fsync"):
        load(tmp_path)


def test_config_error_is_a_value_error_and_the_settings_load_without_click() -> None:
    """A plain ValueError (exit code 2 on the command line, see the tests below):
    the settings load without importing click (issue 12: the monitor's first frame)."""
    error = ConfigError("x")
    assert isinstance(error, ValueError)
    assert not isinstance(error, click.ClickException)
    assert error.exit_code == 2
    assert error.format_message() == str(error) == "x"
    probe = (
        "import sys, sigil.core.config as c; c.load_settings(env={}); print('click' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False"]


@pytest.mark.parametrize("args", [["config", "show"], ["monitor", "--session", "s1", "--once"]])
def test_a_bad_config_file_is_one_line_and_exit_2_for_every_command(
    sigil_home: Path, run_sigil: Callable[..., subprocess.CompletedProcess[str]], args: list[str]
) -> None:
    write_config(sigil_home, "token_budget:\n  default_total: lots\n")
    result = run_sigil(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "token_budget.default_total" in lines[0] and "config.yaml" in lines[0]


@pytest.mark.parametrize(
    "text",
    ["logging: [\n", "logging:\n  fsync: 'open\n", "- just\n- a list\n", "logging: 5\n"],
)
def test_invalid_yaml_is_one_line_naming_the_file(tmp_path: Path, text: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_empty_or_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load(tmp_path / "missing").logging.retention_days == 7
    write_config(tmp_path, "# nothing yet\n")
    assert load(tmp_path).logging.retention_days == 7
    write_config(tmp_path, "logging:\n")
    assert load(tmp_path).logging.retention_days == 7


def test_unknown_keys_warn_once_each_and_are_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(
        tmp_path,
        "logging:\n  retension_days: 3\n  retention_days: 4\nmonitor:\n  mode: json\n",
    )
    settings = load(tmp_path)
    assert settings.logging.retention_days == 4
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "logging.retension_days" in lines[0]
    assert "did you mean logging.retention_days" in lines[0]
    assert "monitor" in lines[1]
    assert all("config.yaml" in line for line in lines)


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SIGIL_BUDGET") as caught:
        load(tmp_path, SIGIL_BUDGET="lots")
    assert "token_budget.default_total" in str(caught.value)
    with pytest.raises(ConfigError, match="SIGIL_FSYNC"):
        load(tmp_path, SIGIL_FSYNC="sometimes")
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_HEADERS"):
        load(tmp_path, OTEL_EXPORTER_OTLP_HEADERS="no-equals-sign")


def test_bad_override_is_reported_as_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"command line: token_budget\.default_total"):
        load(tmp_path, {"token_budget.default_total": "5"})
    with pytest.raises(ConfigError, match=r"unknown setting 'token_budget\.total'"):
        load(tmp_path, {"token_budget.total": 5})


def test_threshold_order_names_the_key_set_by_the_user(tmp_path: Path) -> None:
    write_config(tmp_path, "token_budget:\n  warning_threshold: 0.9\n")
    with pytest.raises(ConfigError, match=r"token_budget\.warning_threshold") as caught:
        load(tmp_path)
    assert "config.yaml" in str(caught.value)


def test_settings_api(tmp_path: Path) -> None:
    settings = load(tmp_path)
    as_dict = settings.as_dict()
    assert set(as_dict) == {
        "logging",
        "monitoring",
        "token_budget",
        "provider",
        "errors",
        "export",
        "pipeline",
        "pricing",
    }
    assert json.loads(json.dumps(as_dict)) == as_dict
    for section, values in as_dict.items():
        for key in values:
            assert settings.source(f"{section}.{key}") == "default"
    with pytest.raises(KeyError):
        settings.source("logging.nope")
    with pytest.raises(AttributeError):
        settings.logging.fsync = "never"  # type: ignore[misc]
    assert Settings().token_budget.default_total == 256_000


# -- the `sigil config` command ----------------------------------------------------


def test_config_show_lists_values_and_sources(
    sigil_home: Path, run_sigil: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    write_config(sigil_home, "logging:\n  fsync: always\n")
    result = run_sigil(
        "config",
        "show",
        "--json",
        env={"SIGIL_BUDGET": "1234", "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s3cret"},
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    settings = document["settings"]
    assert document["config_file"] == str(sigil_home / "config.yaml")
    assert settings["logging.fsync"] == {"value": "always", "source": "config"}
    assert settings["token_budget.default_total"] == {"value": 1234, "source": "env"}
    assert settings["logging.retention_days"] == {"value": 7, "source": "default"}
    assert "s3cret" not in result.stdout  # header values are credentials

    text = run_sigil("config", "show")
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.startswith("logging.fsync"))
    assert '"always"' in line and "[config]" in line


def test_config_path(
    sigil_home: Path, run_sigil: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    result = run_sigil("config", "path")
    assert result.returncode == 0
    assert result.stdout.strip() == str(sigil_home / "config.yaml")


def test_config_show_bad_file_exits_2_with_one_line(
    sigil_home: Path, run_sigil: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    write_config(sigil_home, "logging:\n  retention_days: soon\n")
    result = run_sigil("config", "show")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "logging.retention_days" in lines[0] and "config.yaml" in lines[0]


def test_the_per_signal_otlp_variables_win_over_the_general_ones(tmp_path: Path) -> None:
    env = {
        "SIGIL_HOME": str(tmp_path),
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://general:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318/v1/traces",
        "OTEL_EXPORTER_OTLP_HEADERS": "a=1",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "b=2",
    }
    settings = load_settings(env=env)
    assert settings.export.otlp_endpoint == "http://traces:4318/v1/traces"
    assert settings.export.otlp_headers == {"b": "2"}
    assert settings.source("export.otlp_endpoint") == "env"
    general = {k: v for k, v in env.items() if "TRACES" not in k}
    assert load_settings(env=general).export.otlp_endpoint == "http://general:4318"


def test_the_alert_command_is_a_setting_the_environment_overrides(tmp_path: Path) -> None:
    assert load(tmp_path).monitoring.alert_command is None
    write_config(tmp_path, "monitoring:\n  alert_command: notify-send -u critical\n")
    settings = load(tmp_path)
    assert settings.monitoring.alert_command == "notify-send -u critical"
    assert settings.source("monitoring.alert_command") == "config"
    settings = load(tmp_path, SIGIL_ALERT_COMMAND="logger -t sigil")
    assert settings.monitoring.alert_command == "logger -t sigil"
    assert settings.source("monitoring.alert_command") == "env"
    write_config(tmp_path, "monitoring:\n  alert_command: null\n")
    assert load(tmp_path).monitoring.alert_command is None


@pytest.mark.parametrize("value", ["''", "5", "[notify-send]", '"notify-send \'unclosed"', "'   '"])
def test_a_bad_alert_command_is_one_line_naming_the_key(tmp_path: Path, value: str) -> None:
    path = write_config(tmp_path, f"monitoring:\n  alert_command: {value}\n")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    message = str(caught.value)
    assert "monitoring.alert_command" in message and str(path) in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="SIGIL_ALERT_COMMAND"):
        load(tmp_path / "other", SIGIL_ALERT_COMMAND="say 'unclosed")


def test_monitor_with_a_bad_alert_command_exits_2_with_one_line(
    sigil_home: Path, run_sigil: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    write_config(sigil_home, 'monitoring:\n  alert_command: "say \'unclosed"\n')
    result = run_sigil("monitor", "--session", "nothing", "--mode", "stream")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "monitoring.alert_command" in lines[0]
