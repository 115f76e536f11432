"""``edge serve sync``: matching arrivals, the outbox worker, the report puller and retention, on one client session."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp

from edge.service import BackgroundTasks, ServiceSetupError
from edge.store.spool import Spool
from edge.store.walk import DecodeLimits
from sync import metrics
from sync.arrivals import look_at_arrivals
from sync.cloud import CloudSetupError, load_auth_headers, open_session
from sync.compress import check_codecs
from sync.dicomweb import DicomWebClient, TokenBucket
from sync.outbox import release_interrupted
from sync.reports import ReportPuller, ReportSettings, check_requested
from sync.retention import enforce_retention
from sync.worker import OutboxWorker

if TYPE_CHECKING:  # the whole config is the roof's; a part only reads it
    from edge.node.config import EdgeConfig

log = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 60.0


class SyncService:
    """start()/stop() like every service; ``wake()`` is safe to call from any thread."""

    name = "sync"

    def __init__(self, config: EdgeConfig, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self._session: aiohttp.ClientSession | None = None
        self._tasks = BackgroundTasks("sync")
        self._worker: OutboxWorker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._synced = asyncio.Event()
        self._arrived = asyncio.Event()
        self._report_wake = asyncio.Event()  # woken: a "check now" may be waiting in the database

    async def start(self) -> None:
        cfg = self.config
        try:
            headers = load_auth_headers(cfg.path(cfg.cloud.secrets_file))
            check_codecs(cfg.sync.compress)
        except (CloudSetupError, RuntimeError) as exc:
            raise SyncSetupError(str(exc)) from None
        self._loop = asyncio.get_running_loop()
        try:
            self._session = open_session(cfg)
        except CloudSetupError as exc:
            raise SyncSetupError(str(exc)) from None
        bandwidth = TokenBucket(cfg.sync.bandwidth_bps) if cfg.sync.bandwidth_bps else None
        client = DicomWebClient(self._session, cfg.cloud.dicomweb_url, headers, bandwidth=bandwidth)
        await asyncio.to_thread(release_interrupted)
        if cfg.sync.enabled:
            self._worker = OutboxWorker(
                cfg.sync, self.spool, client, self.spool.tmp, cfg.cloud.read_timeout_s, on_synced=self._synced.set,
                limits=DecodeLimits.from_storage(cfg.storage),
            )
            self._tasks.start(self._worker.run(), name="outbox")
        if cfg.reports.enabled:
            puller = ReportPuller(
                cfg.data_dir,
                ReportSettings(
                    lookback_days=cfg.reports.lookback_days,
                    poll_interval_s=cfg.reports.poll_interval_s,
                    min_backoff_s=cfg.reports.min_backoff_s,
                    max_backoff_s=cfg.reports.max_backoff_s,
                    max_url_chars=cfg.reports.max_url_chars,
                    query_timeout_s=cfg.reports.query_timeout_s,
                    max_report_bytes=cfg.reports.max_report_mb * 2**20,
                    max_deflate_ratio=cfg.storage.max_deflate_ratio,
                ),
            )
            self._tasks.start(self._reports_loop(puller, client), name="reports")
        self._tasks.start(self._arrivals_loop(), name="arrivals")
        self._tasks.start(self._retention_loop(), name="retention")
        log.info(
            "sync: uploading to %s (%d in flight, compression %s)%s",
            cfg.cloud.dicomweb_url, cfg.sync.concurrency, cfg.sync.compress,
            "" if cfg.sync.enabled else " (uploads switched off: [sync] enabled = false)",
        )

    async def _retention_loop(self) -> None:
        """Now, then after every upload that completes a batch, and at least every minute."""
        storage = self.config.storage
        while True:
            self._synced.clear()
            try:
                await asyncio.to_thread(enforce_retention, self.spool, storage.retention_days, storage.high_water_free_mb)
            except Exception:
                log.exception("retention: failed; trying again later")
            try:
                await asyncio.wait_for(self._synced.wait(), RETENTION_INTERVAL_S)
            except TimeoutError:
                pass

    async def _arrivals_loop(self) -> None:
        """Match and raise STAT (sync.arrivals) on every wake and at least every poll, then wake the worker.

        The worker is woken only after the pass, so the claim it makes sees the new study
        matched and a STAT order's late images already at the front.
        """
        while True:
            self._arrived.clear()  # before the pass: a kept instance during it wakes another
            try:
                await asyncio.to_thread(look_at_arrivals)
            except Exception:
                log.exception("sync: matching arrivals to orders failed; trying again at the next wake")
            if self._worker is not None:
                self._worker.wake()
            try:
                await asyncio.wait_for(self._arrived.wait(), self.config.sync.poll_interval_s)
            except TimeoutError:
                pass

    async def _reports_loop(self, puller: ReportPuller, client: DicomWebClient) -> None:
        """A poll every ``[reports] poll_interval_s``, and at once when staff asked "check now".

        A wake (the bell, an instance kept) only costs a database read: the poll starts
        early only if a check request is waiting.
        """
        loop = asyncio.get_running_loop()
        interval = self.config.reports.poll_interval_s
        while True:
            self._report_wake.clear()
            try:
                await _pull_reports(puller, client)
            except Exception:
                log.exception("sync: report poll failed; trying again in %.0fs", interval)
            deadline = loop.time() + interval
            while (left := deadline - loop.time()) > 0:
                try:
                    await asyncio.wait_for(self._report_wake.wait(), left)
                except TimeoutError:
                    break
                self._report_wake.clear()
                try:
                    if await asyncio.to_thread(check_requested):
                        break
                except Exception:
                    log.exception("sync: could not read report check requests")

    def wake(self) -> None:
        """Something new was kept (or STAT, send now): match it, then look at the outbox, now rather than at the next poll."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._arrived.set)  # the arrivals pass wakes the worker
        self._loop.call_soon_threadsafe(self._synced.set)  # the disk filled a little: retention looks
        self._loop.call_soon_threadsafe(self._report_wake.set)  # or staff asked "check for the report now"

    async def stop(self) -> None:
        await self._tasks.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None
        log.info("sync: stopped")


async def _pull_reports(puller: ReportPuller, client: DicomWebClient) -> None:
    pulled = await puller.poll_due(client)
    if pulled:
        metrics.REPORTS_PULLED.inc(pulled)


class SyncSetupError(ServiceSetupError):
    """The sync service cannot start as configured; the message names the key."""
