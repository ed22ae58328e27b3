"""grpc.health.v1 for `disco serve`: Check and Watch over named statuses, and a drain that ends every Watch.

grpcio-health-checking's asyncio servicer never ends a Watch: its handler waits for the next change until the
server cancels it. A client that checks health itself (gRPC's client-side health checking keeps one Watch open per
connection) then held a draining server for all of --grace-s, with no call in flight, and saw its Watch cut with
UNAVAILABLE. Here a drain sets every status to NOT_SERVING for good, and each Watch sends that and ends with OK.
--health-port serves the same statuses through Probes, whose Watch stays open through the drain instead.
"""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disco.service.errors import shown

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health(health_pb2_grpc.HealthServicer):
    """Statuses by service name ("" is the server); an unknown name is NOT_FOUND to Check, SERVICE_UNKNOWN to Watch."""

    def __init__(self) -> None:
        self._status: dict[str, health_pb2.HealthCheckResponse.ServingStatus.ValueType] = {"": NOT_SERVING}
        self._changed = asyncio.Condition()  # held while a status changes: no Watch misses one
        self._draining = False
        self._closed = asyncio.Event()  # set as --health-port's server stops (Probes)

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        """Report a status; ignored once draining (nothing serves again)."""
        async with self._changed:
            if not self._draining:
                self._status[service] = status
                self._changed.notify_all()

    async def drain(self) -> None:
        """Every status NOT_SERVING for good; each open Watch sends it and ends."""
        async with self._changed:
            self._draining = True
            self._status = dict.fromkeys(self._status, NOT_SERVING)
            self._changed.notify_all()

    def close(self) -> None:
        """The drain is over and --health-port's server stops next: its Watches end with OK (Probes)."""
        self._closed.set()

    async def closed(self) -> None:
        await self._closed.wait()

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no health status for service {shown(request.service)}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        sent = None
        while True:
            status = self._status.get(request.service, unknown)
            if status != sent:  # written outside the lock: a slow reader holds up no one else
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            async with self._changed:
                if self._status.get(request.service, unknown) == sent:  # nothing new to send
                    if self._draining:
                        return
                    await self._changed.wait()


class Probes(health_pb2_grpc.HealthServicer):
    """Health's statuses for --health-port. That server stops last, once the drain is over, and holds no call up:
    a Watch ended at the drain would be reopened at once by a checker that retries without a pause, and end again,
    in a spin until the exit. So a Watch here sends NOT_SERVING and stays open until the server stops (ending with
    OK then: a Watch cut by the stop was logged as an error with a traceback)."""

    def __init__(self, health: Health) -> None:
        self._health = health

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        return await self._health.Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        await self._health.Watch(request, context)  # returns at the drain, NOT_SERVING sent
        await self._health.closed()
