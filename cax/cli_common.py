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
    """The config, with the root options that change how it is read (``--runs-db``,
    ``--strict``) applied; a config error is one line and exit 2."""
    ctx = click.get_current_context(silent=True)
    obj = (ctx.find_root().obj if ctx is not None else None) or {}
    try:
        return cfgmod.load(config_path, runs_db=obj.get("runs_db"), strict=bool(obj.get("strict")))
    except cfgmod.ConfigError as e:
        raise Fatal(str(e), 2)


def resolve_host(config, host):
    host = host if host is not None else cfgmod.default_host()
    try:
        config.site(host)
    except cfgmod.ConfigError as e:
        raise Fatal(str(e), 2)
    return host


def check_reach(config, host, itself=True):
    """Exit 2 when this host cannot do its work with this cax (see Config.reach_problem);
    ``itself=False`` lets ``config check`` describe an unreachable host instead."""
    problem = config.reach_problem(host)
    if problem and (itself or not config.site(host).unreachable):
        raise Fatal(problem, 2)


def open_db(config, dry_run=False, create=False, missing_ok=False):
    from cax.runsdb import RunsDBError, connect
    try:
        return connect(config, dry_run=dry_run, create=create, missing_ok=missing_ok)
    except RunsDBError as e:
        raise Fatal(str(e), 1)
