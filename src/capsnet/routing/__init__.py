"""Routing algorithms between two capsule layers."""
