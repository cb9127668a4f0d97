"""Helpers for the metrics tests: a real HTTP client and a Prometheus parser."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from relay.tools.bench import ResponseBody


async def http_get(url: str, method: bytes = b"GET") -> tuple[int, Headers, bytes]:
    """GET (or ``method``) ``url`` over a real connection: status, headers, body."""
    response = await Agent(reactor).request(method, url.encode("ascii"))
    body = ResponseBody()
    response.deliverBody(body)
    return response.code, response.headers, await body.done


class Scrape:
    """One /metrics scrape; ``value(name, **labels)`` reads a sample."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


async def scrape(base_url: str) -> Scrape:
    status, headers, body = await http_get(base_url + "metrics")
    assert status == 200, (status, body)
    return Scrape(body.decode("utf-8"))


def base_url(port: Any) -> str:
    return f"http://127.0.0.1:{port.getHost().port}/"
