"""Which scheduling profile a request runs: the one the caller asked for, else the first matching rule, else
the default. The caller (the gateway) decides whether a client may ask for a profile; routing only checks
that the profile exists.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from routing.config import ProfileRule
from routing.errors import UnknownProfile
from routing.types import RoutingRequest

__all__ = ["ProfileSelector"]


class ProfileSelector:
    """``select(request) -> profile name``; pure and cheap (a few string comparisons per rule)."""

    def __init__(self, profiles: Iterable[str], default: str, rules: Sequence[ProfileRule] = ()) -> None:
        self._profiles = frozenset(profiles)
        if default not in self._profiles:
            raise UnknownProfile(default)
        for rule in rules:
            if rule.profile not in self._profiles:
                raise UnknownProfile(rule.profile)
        self._default = default
        self._rules = tuple(rules)

    @property
    def default(self) -> str:
        return self._default

    def select(self, req: RoutingRequest) -> str:
        if req.profile is not None:
            if req.profile not in self._profiles:
                raise UnknownProfile(req.profile)
            return req.profile
        for rule in self._rules:
            if _matches(rule, req):
                return rule.profile
        return self._default


def _matches(rule: ProfileRule, req: RoutingRequest) -> bool:
    # A rule's model matches the base model or the adapter's own name (what the client asked for).
    if rule.model is not None and not (fnmatch.fnmatchcase(req.model, rule.model)
                                       or (req.lora is not None and fnmatch.fnmatchcase(req.lora, rule.model))):
        return False
    if rule.lora is not None and (req.lora is not None) != rule.lora:
        return False
    return rule.priority is None or req.priority == rule.priority
