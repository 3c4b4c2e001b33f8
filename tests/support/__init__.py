"""Shared helpers for tests that start real processes on loopback ports."""
