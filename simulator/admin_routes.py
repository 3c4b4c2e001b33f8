"""The simulator's /admin endpoints: faults, resets, request records, runner lag and call counts.

Tests and benchmarks drive the replica through them; they are not part of vLLM's API."""
from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulator.faults import Faults
from simulator.json_io import json_body, json_response
from simulator.openai_api import ApiError

if TYPE_CHECKING:
    from simulator.server import SimServer


class AdminRoutes:
    """Reads and replaces the replica's state held by its SimServer (faults are replaced, not mutated,
    on DELETE, so the server is held rather than its parts)."""

    def __init__(self, sim: SimServer) -> None:
        self._sim = sim

    def routes(self) -> list[Route]:
        return [
            Route("/admin/requests", self.admin_requests, methods=["GET"]),
            Route("/admin/faults", self.admin_faults, methods=["GET", "POST", "DELETE"]),
            Route("/admin/reset", self.admin_reset, methods=["POST"]),
            Route("/admin/runner", self.admin_runner, methods=["GET"]),
            Route("/admin/calls", self.admin_calls, methods=["GET"]),
        ]

    async def admin_requests(self, request: Request) -> Response:
        return json_response({"requests": list(self._sim.records)})

    async def admin_faults(self, request: Request) -> Response:
        if request.method == "POST":
            body = await json_body(request)
            try:
                self._sim.faults.update(body)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc
        elif request.method == "DELETE":
            self._sim.faults = Faults()
        return json_response(self._sim.faults.to_dict())

    async def admin_runner(self, request: Request) -> Response:
        """How well the real-time runner keeps up with its time scale (cumulative; take deltas)."""
        r = self._sim.runner
        return json_response({"time_scale": r.time_scale, "steps": r.steps, "engine_busy_s": r.engine_busy_s,
                              "wall_busy_s": r.wall_busy_s, "slipped_s": r.slipped_s, "keep_up": r.keep_up()})

    async def admin_calls(self, request: Request) -> Response:
        """Requests served per route path since start (cumulative; take deltas): how often a router
        calls /tokenize or the render endpoints besides generating."""
        return json_response(dict(self._sim.calls))

    async def admin_reset(self, request: Request) -> Response:
        self._sim.runner.reset()
        return json_response({"restarts": self._sim.runner.restarts, "started_at": self._sim.runner.started_at})
