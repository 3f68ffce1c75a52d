"""The library's version, in a module of its own so it can be read without importing the package."""

__version__ = "0.1.0"
