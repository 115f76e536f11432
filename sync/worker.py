"""The outbox worker: sends what the node kept to the cloud, exactly once, most urgent first.

A few slots run side by side ([sync] concurrency). Each claims one batch (instances of
one study) from the store, compresses it if configured, uploads it with one STOW-RS
request and writes the outcome back. When the link is down a slot backs off (tenacity,
exponential with jitter, capped) and claims afresh afterwards, so whatever is most
urgent by then goes first. Failures that the cloud will never accept are quarantined
with their reason for a human; everything else stays queued.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_never,
    wait_random_exponential,
)

from edge.store.spool import Spool
from edge.store.walk import DecodeLimits
from sync import metrics
from sync.backoff import wait_before_attempt
from sync.compress import PreparedUpload, UnfitForUpload, prepare_upload
from sync.config import SyncSection, parse_window
from sync.dicomweb import DicomWebClient, DicomWebError, StowResult
from sync.outbox import (
    Batch,
    BatchItem,
    claim_batch,
    clear_uncertain,
    fail_unfinished,
    mark_failed,
    mark_quarantined,
    mark_synced,
    next_attempt_at,
    record_progress,
)

log = logging.getLogger(__name__)

# A failure the cloud gives per instance that may pass later: out of resources, processing failure.
_TRANSIENT_CODES = {0x0110, 0x0272}
# After this many failed attempts on the same rows with the server answering (5xx), park
# them on their own backoff so one poisoned instance cannot hold the queue.
PARK_AFTER_ATTEMPTS = 5
# Answers about the node's set-up, not the instance (credentials, wrong URL): nothing to
# quarantine; keep everything queued, back off, and let /healthz and the log say why.
NODE_LEVEL_STATUSES = frozenset({401, 403, 404, 405, 407})
# An upload slower than this is taken as stalled (the server stopped reading) and retried.
MIN_LINK_BYTES_PER_S = 8000
# How often a request under way writes how far it got (one short write per slot): the console's byte progress.
PROGRESS_EVERY_S = 1.0


class CloudUnreachable(Exception):
    """The link or the cloud is down (no answer, 5xx, 429): the slot backs off."""


def is_transient_code(code: int) -> bool:
    return code in _TRANSIENT_CODES or (code & 0xFF00 == 0xA700 and code != 0xA770)


def routine_allowed_now(windows: Sequence[str], now: dt.datetime | None = None) -> bool:
    """Routine images upload only inside the configured windows (local time); [] = always."""
    if not windows:
        return True
    current = (now or dt.datetime.now()).time()
    for text in windows:
        start, end = parse_window(text)
        inside = start <= current < end if start <= end else (current >= start or current < end)
        if inside:
            return True
    return False


class OutboxWorker:
    """Runs [sync] concurrency slots until cancelled; ``wake()`` when something new is kept."""

    def __init__(
        self,
        settings: SyncSection,
        spool: Spool,
        client: DicomWebClient,
        tmp_dir: Path,
        read_timeout_s: float = 120.0,
        on_synced: Callable[[], None] | None = None,
        limits: DecodeLimits | None = None,
    ) -> None:
        """``limits``: what preparing one instance may cost to decode (``[storage]``); over them it is quarantined."""
        self.settings = settings
        self.limits = limits or DecodeLimits()
        self.on_synced = on_synced
        self.settings_read_timeout_s = read_timeout_s
        self.spool = spool
        self.client = client
        self.tmp_dir = tmp_dir
        self._wake = asyncio.Event()
        self._wait = wait_random_exponential(multiplier=settings.retry_min_s, max=settings.retry_max_s)
        self._told_held = False  # "routine images held for the window" said once per closed window

    def wake(self) -> None:
        """New work arrived (call from the loop's thread; threads use call_soon_threadsafe)."""
        self._wake.set()

    def backoff_s(self, attempts: int) -> float:
        """Wait before the ``attempts``-th retry of the same rows (tenacity's jittered exponential)."""
        return wait_before_attempt(self._wait, attempts)

    async def run(self) -> None:
        slots = [asyncio.create_task(self._slot(n), name=f"outbox-slot-{n}") for n in range(self.settings.concurrency)]
        try:
            await asyncio.gather(*slots)
        finally:
            for slot in slots:
                slot.cancel()
            await asyncio.gather(*slots, return_exceptions=True)

    async def _slot(self, number: int) -> None:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(CloudUnreachable),
            wait=self._wait,
            stop=stop_never,
            before_sleep=lambda state: log.warning(
                "sync: cloud unreachable (%s); slot %d waits %.0fs",
                state.outcome.exception() if state.outcome else "?", number,
                state.next_action.sleep if state.next_action else 0,
            ),
            reraise=True,
        ):
            with attempt:
                while True:
                    # Cleared before looking at the outbox, not after: a row kept (and its wake) while
                    # the slot finds the outbox empty keeps the event set, so _idle returns at once
                    # instead of at the next poll. A wake before this line is for a row the look sees.
                    self._wake.clear()
                    sent = await self.send_next()
                    if not sent:
                        await self._idle()

    async def _idle(self) -> None:
        """Sleep until woken (since the slot last looked at the outbox), until a parked row is due, or the poll interval."""
        timeout = self.settings.poll_interval_s
        routine = routine_allowed_now(self.settings.routine_windows)
        due = await asyncio.to_thread(next_attempt_at, routine)
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        if routine:
            self._told_held = False
        elif not self._told_held and (due is None or due > now) \
                and (held := await asyncio.to_thread(next_attempt_at, True)) is not None and held <= now:
            self._told_held = True  # only routine rows are due and the slot just passed them over: said once
            log.info("sync: routine images due but outside the upload windows (%s): held until one opens",
                     ", ".join(self.settings.routine_windows))
        if due is not None:
            timeout = max(0.05, min(timeout, (due - dt.datetime.now(dt.UTC).replace(tzinfo=None)).total_seconds()))
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    async def send_next(self) -> bool:
        """Claim and send one batch; False when nothing is due. Raises CloudUnreachable."""
        cfg = self.settings
        routine = routine_allowed_now(cfg.routine_windows)
        batch = await asyncio.to_thread(claim_batch, routine, cfg.batch_max_bytes, cfg.batch_max_instances)
        if batch is None:
            return False
        try:
            await self._send(batch)
        except asyncio.CancelledError:
            # Stopping mid-request: the body may be on the wire. Back in the queue, uncertain.
            await asyncio.shield(asyncio.to_thread(fail_unfinished, batch, "interrupted by shutdown", 0.0, True))
            raise
        except CloudUnreachable:
            await asyncio.to_thread(fail_unfinished, batch, "cloud unreachable", 0.0)
            raise
        except Exception as exc:  # a bug must not leave rows "sending" or stop the slot
            log.exception("sync: sending study %s failed unexpectedly", batch.study_instance_uid)
            await asyncio.to_thread(
                fail_unfinished, batch, f"internal error: {type(exc).__name__}", self.backoff_s(PARK_AFTER_ATTEMPTS)
            )
        return True

    async def _send(self, batch: Batch) -> None:
        items = list(batch.items)
        items = await self._skip_what_the_cloud_has(batch, items)
        if not items:
            return
        missing = {i.outbox_id: "instance file missing from the spool" for i in items if not (self.spool.root / i.path).exists()}
        if missing:
            await asyncio.to_thread(  # a database write, off the loop like every other outcome
                mark_quarantined, batch.study_instance_uid, missing, {i.outbox_id: i.sop_instance_uid for i in items}
            )
            items = [i for i in items if i.outbox_id not in missing]
        if not items:
            return
        outcomes = await asyncio.to_thread(self._prepare, items)
        unfit = {i.outbox_id: reason for i, reason in zip(items, outcomes) if isinstance(reason, str)}
        prepared = [p for p in outcomes if isinstance(p, PreparedUpload)]
        try:
            if unfit:
                metrics.FAILURES.labels("unfit").inc(len(unfit))
                await asyncio.to_thread(
                    mark_quarantined, batch.study_instance_uid, unfit, {i.outbox_id: i.sop_instance_uid for i in items}
                )
                items = [i for i in items if i.outbox_id not in unfit]
            if items:
                await self._upload(batch, items, prepared)
        finally:
            for p in prepared:
                if p.temporary:
                    p.path.unlink(missing_ok=True)

    def _prepare(self, items: Sequence[BatchItem]) -> list[PreparedUpload | str]:
        """What to send for each item, or why it cannot be sent: quarantined at once, since a retry would fail the same way."""
        outcomes: list[PreparedUpload | str] = []
        for item in items:
            try:
                outcomes.append(prepare_upload(self.spool.root / item.path, self.tmp_dir, self.settings.compress, self.limits))
            except UnfitForUpload as exc:
                outcomes.append(exc.reason)
            except OSError as exc:
                outcomes.append(f"not sent: the spool file cannot be read ({exc.strerror or exc})")
            except Exception as exc:  # a decoder's bug or MemoryError: the same file fails the same way next time
                log.exception("sync: preparing instance %s for upload failed", item.sop_instance_uid)
                outcomes.append(f"not sent: preparing it for upload failed ({type(exc).__name__})")
        return outcomes

    async def _skip_what_the_cloud_has(self, batch: Batch, items: list[BatchItem]) -> list[BatchItem]:
        """After an ambiguous failure the cloud may hold some of these already: ask before resending."""
        uncertain = [i for i in items if i.uncertain]
        if not uncertain:
            return items
        try:
            present = await self.client.existing_instances(batch.study_instance_uid, [i.sop_instance_uid for i in uncertain])
        except DicomWebError as exc:
            await asyncio.to_thread(mark_failed, batch.study_instance_uid, [i.outbox_id for i in items], str(exc), 0.0)
            if exc.transient:
                raise CloudUnreachable(str(exc)) from exc
            raise
        done = {i.outbox_id: 0 for i in uncertain if i.sop_instance_uid in present}
        if done:
            log.info("sync: %d instance(s) of study %s were already in the cloud: not sent again", len(done), batch.study_instance_uid)
            await asyncio.to_thread(mark_synced, batch.study_instance_uid, done)
        await asyncio.to_thread(clear_uncertain, [i.outbox_id for i in uncertain if i.outbox_id not in done])
        return [i for i in items if i.outbox_id not in done]

    async def _upload(self, batch: Batch, items: list[BatchItem], prepared: list[PreparedUpload]) -> None:
        study = batch.study_instance_uid
        ids = [i.outbox_id for i in items]
        budget = self.settings_read_timeout_s + sum(p.upload_bytes for p in prepared) / MIN_LINK_BYTES_PER_S
        sent = [0] * len(prepared)

        def heard(index: int, nbytes: int) -> None:
            sent[index] = nbytes

        reporter = asyncio.create_task(self._report_progress(items, prepared, sent), name="outbox-progress")
        try:
            async with asyncio.timeout(budget):
                result = await self.client.stow([p.path for p in prepared], study, on_file_bytes=heard)
        except TimeoutError:
            stalled = DicomWebError(f"STOW-RS stalled: not done after {budget:.0f}s", transient=True, body_sent=True)
            await self._on_request_failed(batch, items, prepared, stalled)
            return
        except DicomWebError as exc:
            await self._on_request_failed(batch, items, prepared, exc)
            return
        except OSError as exc:  # a local file vanished or changed under us
            await asyncio.to_thread(mark_failed, study, ids, f"local file error: {exc}", self.backoff_s(items[0].attempts + 1))
            return
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        await self._record(batch, items, prepared, result)

    async def _report_progress(self, items: Sequence[BatchItem], prepared: Sequence[PreparedUpload],
                               sent: list[int]) -> None:
        """Every PROGRESS_EVERY_S while the request runs: what has left of each instance, in its spool bytes."""
        written: dict[int, int] = {}
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            gone = {item.outbox_id: item.size if n >= prep.upload_bytes else item.size * n // max(1, prep.upload_bytes)
                    for item, prep, n in zip(items, prepared, sent) if n}
            changed = {oid: n for oid, n in gone.items() if written.get(oid) != n}
            if changed:
                await asyncio.to_thread(record_progress, changed)
                written.update(changed)

    async def _on_request_failed(
        self, batch: Batch, items: list[BatchItem], prepared: list[PreparedUpload], exc: DicomWebError
    ) -> None:
        study = batch.study_instance_uid
        ids = [i.outbox_id for i in items]
        metrics.FAILURES.labels(failure_reason(exc)).inc()
        if exc.transient or exc.status in NODE_LEVEL_STATUSES:
            attempts = max(i.attempts for i in items) + 1
            parked = exc.status is not None and attempts >= PARK_AFTER_ATTEMPTS
            delay = self.backoff_s(attempts) if parked else 0.0
            await asyncio.to_thread(mark_failed, study, ids, str(exc), delay, exc.body_sent)
            if exc.partial is not None:
                await self._record(batch, items, prepared, exc.partial, only_listed=True)
            raise CloudUnreachable(str(exc)) from exc
        if len(items) > 1:
            # The whole request was refused: send one by one so only the bad instance is quarantined.
            log.warning("sync: study %s batch of %d refused (%s): sending one by one", study, len(items), exc)
            for item, prep in zip(items, prepared):
                await self._upload(batch, [item], [prep])
            return
        await asyncio.to_thread(
            mark_quarantined, study, {ids[0]: str(exc)}, {ids[0]: items[0].sop_instance_uid}
        )

    async def _record(
        self, batch: Batch, items: list[BatchItem], prepared: list[PreparedUpload], result: StowResult,
        only_listed: bool = False,
    ) -> None:
        """Write what the cloud said about each instance."""
        study = batch.study_instance_uid
        synced: dict[int, int] = {}
        quarantine: dict[int, str] = {}
        retry: list[BatchItem] = []
        for item, prep in zip(items, prepared):
            uid = item.sop_instance_uid
            if uid in result.stored:
                synced[item.outbox_id] = prep.upload_bytes
            elif uid in result.failed:
                code = result.failure_codes.get(uid)
                if code is not None and is_transient_code(code):
                    retry.append(item)
                else:
                    quarantine[item.outbox_id] = f"cloud refused it: {result.failed[uid]}"
            elif not only_listed:
                retry.append(item)  # the server did not account for it: not stored
        for warning in result.warnings:
            log.warning("sync: study %s: cloud warning: %s", study, warning)
        await asyncio.to_thread(mark_synced, study, synced)
        if synced:
            metrics.record_synced(len(synced), sum(synced.values()))
            if self.on_synced is not None:
                self.on_synced()
            log.info(
                "sync: study %s: %d instance(s) in the cloud, %d bytes sent", study, len(synced), sum(synced.values())
            )
        if quarantine:
            metrics.FAILURES.labels("refused").inc(len(quarantine))
            await asyncio.to_thread(mark_quarantined, study, quarantine, {i.outbox_id: i.sop_instance_uid for i in items})
        if retry:
            metrics.FAILURES.labels("not_stored").inc(len(retry))
            reasons = {result.failed.get(i.sop_instance_uid, "not in the cloud's answer") for i in retry}
            await asyncio.to_thread(
                mark_failed, study, [i.outbox_id for i in retry], "; ".join(sorted(reasons)),
                self.backoff_s(max(i.attempts for i in retry) + 1),
            )


def failure_reason(exc: DicomWebError) -> str:
    """A small fixed set of labels for the failures metric."""
    if exc.status is None:
        return "timeout" if "timed out" in exc.reason else "connection"
    if exc.status >= 500:
        return "server_error"
    if exc.status in (401, 403):
        return "auth"
    if exc.status == 429:
        return "throttled"
    return "refused"

