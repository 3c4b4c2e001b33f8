"""Gravity's routing layer: endpoint datastore, metrics scraping and the pluggable scheduler.

No HTTP types live here; the gateway injects I/O (``fetch``) and calls :class:`Scheduler`.
"""
from __future__ import annotations

from routing.config import PluginSpec, ProfilePluginRef, ProfileSpec, RoutingConfig, load_routing_config
from routing.datastore import Datastore, InflightTicket
from routing.errors import ModelNotServed, NoHealthyEndpoint, RoutingError, UnknownProfile
from routing.plugins.registry import Registry, default_registry
from routing.scheduler import Scheduler, build_scheduler
from routing.scraper import Collector, merge_metrics, parse_models, parse_vllm_metrics
from routing.types import (
    Candidate,
    Decision,
    EndpointMetrics,
    EndpointSpec,
    EndpointView,
    RoutingRequest,
    Snapshot,
)

__all__ = [
    "Candidate",
    "Collector",
    "Datastore",
    "Decision",
    "EndpointMetrics",
    "EndpointSpec",
    "EndpointView",
    "InflightTicket",
    "ModelNotServed",
    "NoHealthyEndpoint",
    "PluginSpec",
    "ProfilePluginRef",
    "ProfileSpec",
    "Registry",
    "RoutingConfig",
    "RoutingError",
    "RoutingRequest",
    "Scheduler",
    "Snapshot",
    "UnknownProfile",
    "build_scheduler",
    "default_registry",
    "load_routing_config",
    "merge_metrics",
    "parse_models",
    "parse_vllm_metrics",
]
