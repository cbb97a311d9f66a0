"""``sigil config``: the effective settings and where each one comes from (contract 9)."""

from __future__ import annotations

import json

import click


@click.group("config", context_settings={"help_option_names": ["-h", "--help"]})
def config() -> None:
    """Show the effective configuration and where it comes from.

    Precedence, highest first: command-line flags, environment variables,
    config.yaml, defaults.
    """


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print {key: {value, source}} as JSON.")
def show(as_json: bool) -> None:
    """Print every setting, its effective value and its source."""
    from sigil.core.config import load_settings
    from sigil.telemetry.sanitization import REDACTED

    settings = load_settings()
    values = settings.as_dict()
    # OTLP headers usually carry an API key: show which are set, not their values.
    values["export"]["otlp_headers"] = dict.fromkeys(values["export"]["otlp_headers"], REDACTED)
    rows = [
        (f"{section}.{key}", value, settings.source(f"{section}.{key}"))
        for section, section_values in values.items()
        for key, value in section_values.items()
    ]
    if as_json:
        document = {
            "config_file": str(settings.config_path),
            "settings": {key: {"value": value, "source": source} for key, value, source in rows},
        }
        click.echo(json.dumps(document, indent=2))
        return
    exists = "" if settings.config_path.exists() else " (not present: defaults apply)"
    click.echo(f"# config file: {settings.config_path}{exists}")
    width = max(len(key) for key, _, _ in rows)
    for key, value, source in rows:
        shown = json.dumps(value, separators=(", ", ": "))
        click.echo(f"{key.ljust(width)}  {shown}  [{source}]")


@config.command("path")
def path() -> None:
    """Print the path of config.yaml ($SIGIL_HOME/config.yaml or ~/.sigil/config.yaml)."""
    from sigil.core.config import config_file_path

    click.echo(str(config_file_path()))
