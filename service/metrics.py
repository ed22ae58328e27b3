"""Prometheus metrics of one server, in a registry of its own (so tests can run several servers)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("disco_requests", "RPCs served, by method and status code",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("disco_request_duration_seconds", "RPC latency, by method", ["method"],
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
                                 registry=self.registry)
        self.images = Counter("disco_images", "Images compressed or decompressed, by method", ["method"],
                              registry=self.registry)
        self.code_bytes = Histogram("disco_code_bytes", "Size of each code made by Compress, header included",
                                    buckets=(2, 4, 6, 8, 10, 12, 16, 24, 32, 64), registry=self.registry)
        self.model = Info("disco_model", "Models loaded", ["name", "version"], registry=self.registry)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
