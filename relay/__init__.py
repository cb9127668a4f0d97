"""Relay: a real-time message relay server on Twisted."""

__version__ = "0.1.0"
