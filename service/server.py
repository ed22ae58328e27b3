"""`disco serve`: the grpc.aio server with health, reflection and Prometheus metrics.

create_server(cfg) builds and starts a server (tests use port 0); serve(cfg) runs one until SIGTERM.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from disco.service.config import ServeConfig
from disco.service.metrics import Metrics
from disco.service.pipeline import Pipeline
from disco.service.repository import EMBEDDED, Repository
from disco.service.runtime import RuntimeOptions
from disco.service.security import TokenAuth, server_credentials
from disco.service.servicer import CodecServicer
from disco.v1 import codec_pb2, codec_pb2_grpc

log = logging.getLogger("disco.serve")
SERVICE = codec_pb2.DESCRIPTOR.services_by_name["Codec"].full_name  # "disco.v1.Codec"


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: CodecServicer

    async def stop(self, grace: float | None = None) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        self.servicer.executor.shutdown(wait=False)


async def create_server(cfg: ServeConfig) -> Running:
    """Load and warm every model, then start serving; health says SERVING only after warm-up."""
    repo = Repository.load(Path(cfg.repository) if cfg.repository else EMBEDDED)
    pipeline = Pipeline(repo, RuntimeOptions(intra_op_threads=cfg.intra_op_threads), cfg.default_model)
    metrics = Metrics()
    for e in repo.entries():
        metrics.model.labels(e.name, e.version).info({"fingerprint": e.fingerprint.hex()})
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.keepalive_time_ms", int(cfg.keepalive_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(cfg.min_client_ping_s * 1000)),
        ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(cfg.grace_s * 1000)),
    ]
    token = cfg.token()
    server = grpc.aio.server(options=options, interceptors=[TokenAuth(token)] if token else [])
    servicer = CodecServicer(pipeline, cfg, metrics)
    codec_pb2_grpc.add_CodecServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    creds = server_credentials(cfg)
    address = f"{cfg.host}:{cfg.port}"
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {cfg.host}:{cfg.port}")
    await server.start()
    await asyncio.get_running_loop().run_in_executor(servicer.executor, pipeline.warm_up)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if cfg.metrics_port:
        metrics.serve(cfg.metrics_port)
    names = ", ".join(f"{e.name}/{e.version}" for e in repo.entries())
    log.info("serving %s on %s:%d (%s%s, metrics %s)", names, cfg.host, port,
             "mTLS" if cfg.tls_client_ca else "TLS" if creds else "plaintext", ", token auth" if token else "",
             cfg.metrics_port or "off")
    return Running(server, port, health_servicer, servicer)


async def serve(cfg: ServeConfig) -> None:
    running = await create_server(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (grace %.1fs)", cfg.grace_s)
    await running.stop(cfg.grace_s)


def main(argv: list[str] | None = None) -> int:
    cfg = ServeConfig.from_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(cfg))
    return 0
