"""cax: Copying All XENON, a data-management daemon for experiment data."""

__version__ = "0.9.0"
