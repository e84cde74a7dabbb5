"""The package version, kept apart so that any module can name it without importing the package root."""

__version__ = "0.4.0"
