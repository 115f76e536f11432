"""The heartbeat: the node's health and key figures pushed to central monitoring.

Nodes sit behind NAT, so Prometheus cannot scrape them; each node PUTs its current
state to a Pushgateway group ``job="clinic_edge", node_id=<id>`` instead. A PUT
replaces the whole group, so only the latest state ever matters: a push that fails
is dropped, never queued, and the next tick measures afresh. Pushes run one at a
time with a timeout, so a hanging link cannot pile them up. The same figures go to a
node_exporter textfile, written atomically (temp file + rename) by prometheus_client.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    delete_from_gateway,
    push_to_gateway,
    write_to_textfile,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from edge.appliance.slots import slot_state
from edge.node.config import EdgeConfig
from edge.ops.metrics import fleet_registry

log = logging.getLogger(__name__)

JOB = "clinic_edge"
TEXTFILE_NAME = "clinic_edge.prom"
JITTER = 0.2
"""Each wait is push_interval_s × (1 ± JITTER), so a fleet that came back from one power cut spreads out."""

Handler = Callable[..., Callable[[], None]]


class HeartbeatSetupError(Exception):
    """The [ops] heartbeat settings cannot work (secrets file, CA bundle); the message names the key."""


def grouping_key(config: EdgeConfig) -> dict[str, str]:
    return {"node_id": config.node.id}


def _auth_headers(config: EdgeConfig) -> dict[str, str]:
    from sync.cloud import CloudSetupError, load_auth_headers

    try:
        return load_auth_headers(config.path(config.ops.pushgateway_secrets_file))
    except CloudSetupError as exc:
        raise HeartbeatSetupError(str(exc).replace("[cloud] secrets_file", "[ops] pushgateway_secrets_file")) from None


def _ssl_context(config: EdgeConfig) -> ssl.SSLContext:
    ca_bundle = config.path(config.ops.pushgateway_ca_bundle)
    try:
        return ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
    except (OSError, ssl.SSLError) as exc:
        raise HeartbeatSetupError(f"[ops] pushgateway_ca_bundle: {exc}") from None


def make_handler(config: EdgeConfig) -> Handler:
    """A prometheus_client push handler: our credentials, verified TLS, never a proxy."""
    auth = _auth_headers(config)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=_ssl_context(config))
    )
    if auth and config.ops.pushgateway_url.startswith("http://"):
        log.warning("heartbeat: sending Pushgateway credentials without TLS (%s)", config.ops.pushgateway_url)

    def handler(
        url: str, method: str, timeout: float | None, headers: Sequence[tuple[str, str]], data: bytes
    ) -> Callable[[], None]:
        def send() -> None:
            request = urllib.request.Request(url, data=data or None, method=method)
            for key, value in [*headers, *auth.items()]:
                request.add_header(key, value)
            with opener.open(request, timeout=timeout) as response:
                response.read()

        return send

    return handler


def push(config: EdgeConfig, registry: CollectorRegistry, handler: Handler) -> None:
    """One PUT of the whole group (blocking; raises OSError / HTTPError on failure)."""
    push_to_gateway(
        config.ops.pushgateway_url, JOB, registry,
        grouping_key=grouping_key(config), timeout=config.ops.push_timeout_s, handler=handler,
    )


def delete_group(config: EdgeConfig) -> None:
    """Remove this node's group from the Pushgateway (decommissioning); raises on failure."""
    delete_from_gateway(
        config.ops.pushgateway_url, JOB,
        grouping_key=grouping_key(config), timeout=config.ops.push_timeout_s, handler=make_handler(config),
    )


def textfile_path(config: EdgeConfig) -> Path | None:
    folder = config.path(config.ops.textfile_dir)
    return folder / TEXTFILE_NAME if folder else None


def write_textfile(path: Path, registry: CollectorRegistry) -> None:
    """Atomic: node_exporter never reads a half-written file (temp name does not end in .prom)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)


def next_wait(interval_s: float) -> float:
    return interval_s * random.uniform(1 - JITTER, 1 + JITTER)


class ApplianceCollector(Collector):
    """The slot and version running and an update that failed, for central ops: the ops part's
    fleet collector, so the heartbeat, the textfile and /metrics all carry it. Nothing off the appliance."""

    def __init__(self, config: EdgeConfig | None = None) -> None:
        self.config = config

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        state = slot_state()
        if state is None:
            return
        yield InfoMetricFamily("edge_appliance_slot", "The root slot running, its version, the other slot's version", value={
            "running_slot": state.running_slot, "running_version": state.running_version or "",
            "other_slot": state.other_slot, "other_version": state.other_version or "", "next_boot": state.next_boot or "",
        })
        update = state.update
        failed = GaugeMetricFamily("edge_update_failed", "1 when an update used up its boot tries and the old slot runs again",
                                   labels=["slot", "version", "tries"])
        if update is not None and update.state == "failed":
            failed.add_metric([update.slot, update.version or "", str(update.tries_done)], 1.0)
        yield failed
        yield GaugeMetricFamily("edge_update_pending", "1 while an installed update waits to boot or is on trial",
                                value=float(update is not None and update.state in ("pending", "trial")))


def appliance_collector(config: EdgeConfig) -> ApplianceCollector:
    return ApplianceCollector(config)


class Heartbeat:
    """Push + textfile on a jittered timer; ``run()`` until cancelled, logging only changes."""

    def __init__(self, config: EdgeConfig, services: tuple[str, ...] = ("dicom", "sync")) -> None:
        self.config = config
        self.registry = fleet_registry(config, services)
        self.handler = make_handler(config) if config.ops.pushgateway_url else None
        self.textfile = textfile_path(config)
        self._push_ok: bool | None = None
        self._textfile_ok: bool | None = None

    @property
    def enabled(self) -> bool:
        return self.handler is not None or self.textfile is not None

    async def run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(next_wait(self.config.ops.push_interval_s))

    async def beat(self) -> None:
        """Measure now and send; every failure is logged once per change and then dropped."""
        if self.textfile is not None:
            try:
                await asyncio.to_thread(write_textfile, self.textfile, self.registry)
                self._report("_textfile_ok", True, "textfile: writing %s", self.textfile)
            except Exception as exc:  # noqa: BLE001 - a bad folder must not stop the heartbeat
                self._report("_textfile_ok", False, "textfile: cannot write %s: %s", self.textfile, exc)
        if self.handler is not None:
            url = self.config.ops.pushgateway_url
            try:
                # The thread may outlive the timeout only by urllib's own timeout (same value).
                await asyncio.wait_for(
                    asyncio.to_thread(push, self.config, self.registry, self.handler),
                    self.config.ops.push_timeout_s + 1.0,
                )
                self._report("_push_ok", True, "heartbeat: pushing to %s as node_id=%s", url, self.config.node.id)
            except (OSError, TimeoutError) as exc:
                self._report("_push_ok", False, "heartbeat: push to %s failed (%s); next one carries the latest state", url, exc)
            except Exception as exc:  # noqa: BLE001 - a heartbeat bug must not stop the node
                self._report("_push_ok", False, "heartbeat: push to %s failed: %r", url, exc)

    def _report(self, attr: str, ok: bool, message: str, *args: object) -> None:
        if getattr(self, attr) is not ok:
            (log.info if ok else log.warning)(message, *args)
            setattr(self, attr, ok)
