"""Tunnel backends (see ``base``)."""
