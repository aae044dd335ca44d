"""What the ``cax`` command line and the admin tools (``cax mv``, ``cax rm``, ...) share: the
one-line fatal error and loading the config, the site and the Runs DB for a command.

Its own module so that ``cax.cli`` can register the admin commands and the admin commands can use
these without the two modules importing each other.
"""
from __future__ import annotations

import click

from cax import config as cfgmod


class Fatal(click.ClickException):
    """An error that ends cax with a one-line message and the given exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.exit_code = code

    def show(self, file=None):
        click.echo(f"cax: error: {self.message}", err=True)


def settings(ctx, config_path=None, host=None):
    obj = ctx.find_root().obj or {}
    # `--host ""` is a mistake to report, not a request for the default
    return config_path or obj.get("config_path"), host if host is not None else obj.get("host")


def load_config(config_path):
    try:
        return cfgmod.load(config_path)
    except cfgmod.ConfigError as e:
        raise Fatal(str(e), 2)


def resolve_host(config, host):
    host = host if host is not None else cfgmod.default_host()
    try:
        config.site(host)
    except cfgmod.ConfigError as e:
        raise Fatal(str(e), 2)
    return host


def open_db(config, dry_run=False, create=False, missing_ok=False):
    from cax.runsdb import RunsDBError, connect
    try:
        return connect(config, dry_run=dry_run, create=create, missing_ok=missing_ok)
    except RunsDBError as e:
        raise Fatal(str(e), 1)
