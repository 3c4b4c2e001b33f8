"""Gravity's edges: the ASGI app, its config, and the errors clients see."""
from __future__ import annotations

from gateway.app import create_app
from gateway.config import ConfigError, GatewayConfig, load_config, parse_config
from gateway.errors import GatewayError

__all__ = ["ConfigError", "GatewayConfig", "GatewayError", "create_app", "load_config", "parse_config"]
