"""cax: Copying All XENON, a data-management daemon for experiment data."""

import sys

__version__ = "0.9.0"


def python_m(module: str) -> list:
    """The start of a command line that runs ``python -m module`` of cax in a child process (the
    demo's steps, batch jobs).

    ``-P`` keeps the child's working directory off ``sys.path``: with plain ``-m`` a folder named
    ``cax`` there (a checkout, a backup, a job's log directory) would be imported instead of the
    installed package. The child finds cax where this process's interpreter does (installed, or on
    ``PYTHONPATH``).
    """
    return [sys.executable, "-P", "-m", module]
