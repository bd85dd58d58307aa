"""The runner of batch lines: an asyncio task in every ingress replica.

The work is the database's, not the runner's. Each round a runner

1. expires the queued lines of batches past their completion window, and deletes files past
   their retention;
2. claims queued lines (up to ``batches.max_concurrent_lines`` running at once) with a
   conditional UPDATE that sets it as the owner until a lease, which it renews while they run;
3. runs each line through the same lifecycle as an interactive request
   (``ImageGenerationService.generate`` / ``edit``: reserve at the batch price, plan,
   generate in the batch lane, settle once in ``hand_over``), its answer handed over into a
   buffer, and records the output line (in the file store) and the line's end (in the
   database, only while it still owns the line);
4. assembles the output and error files of a batch whose lines are all done, and ends it.

Killed at any point, it loses nothing: its lines' leases run out and another runner (another
replica, or this one restarted by Serve) claims them. No line is charged twice: every attempt
of a line carries the same Idempotency-Key (``batch-line-<id>``), so the reservation of a
first attempt that was charged but never recorded hands its stored outcome to the next
attempt (a replay, free), and one whose runner died with the reservation open is refunded by
the orphan sweep (the reservation names the dead replica) before the line runs again (until
then the claim answers 409 "in use" and the line waits ``retry_after_s``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from serve_app.accounts.store import AccountStore
from serve_app.batches.lines import check_batchable
from serve_app.batches.store import BatchRow, BatchStore, FileRow, LineRow, new_id
from serve_app.charge import hand_over
from serve_app.config import AppConfig
from serve_app.errors import APIError, IdempotencyConflict, ModelUnavailable, ServerOverloaded
from serve_app.http_errors import error_body
from serve_app.lane import batch_lane
from serve_app.storage import ImageStore, StorageError

logger = logging.getLogger("ray.serve")

# Refusals that say "not now": the line goes back to the queue rather than failing.
RETRY_LATER = (ModelUnavailable, ServerOverloaded)
# What a line that never ran (or kept killing its runner) says in the error file.
UNRUN = {
    "cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "failed": ("batch_request_failed", "This request stopped its runner on every attempt; it was not charged."),
}
MAINTENANCE_EVERY_S = 10.0


class BatchMetrics:
    """Lines by state and the batch lane's images (``imagegen_batch_lines{state}``,
    ``imagegen_batch_images_total{model}``); a no-op outside Serve."""

    def __init__(self, enabled: bool) -> None:
        self._lines = self._images = None
        if enabled:
            from ray.serve.metrics import Counter, Gauge

            self._lines = Gauge(
                "imagegen_batch_lines",
                "Lines of running batches by state (every ingress replica reports all).",
                tag_keys=("state",),
            )
            self._images = Counter(
                "imagegen_batch_images_total", "Images the batch lane delivered.", tag_keys=("model",)
            )

    def lines(self, states: dict[str, int]) -> None:
        if self._lines is not None:
            for state in ("queued", "running", "succeeded", "failed", "cancelled", "expired"):
                self._lines.set(states.get(state, 0), tags={"state": state})

    def images(self, model: str, count: int) -> None:
        if self._images is not None and count:
            self._images.inc(count, tags={"model": model})


class BatchRunner:
    def __init__(
        self,
        config: AppConfig,
        service: Any,
        accounts: AccountStore,
        store: BatchStore,
        files: ImageStore,
        owner: str,
        metrics: BatchMetrics | None = None,
    ) -> None:
        self._config = config
        self._settings = config.batches
        self._service = service
        self._accounts = accounts
        self._store = store
        self._files = files
        self.owner = owner
        self._metrics = metrics or BatchMetrics(enabled=False)
        self._lane = batch_lane(self._settings.price_factor)
        self._running: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_maintenance = 0.0
        self._last_renewal = 0.0

    # -- life --------------------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        """Run the loop as a task of the running event loop, once."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="BatchRunner")
        return self._task

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("batch runner round failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._settings.poll_interval_s)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        """Stop claiming, and cancel the lines running here (their leases run out; another
        runner takes them). A test's stand-in for a kill."""
        tasks = [task for task in (self._task, *self._running.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def step(self) -> None:
        """One round: maintenance, claims, lease renewal, one batch finalized."""
        now = time.time()
        if now - self._last_maintenance >= MAINTENANCE_EVERY_S:
            self._last_maintenance = now
            await self._maintain(now)
        free = self._settings.max_concurrent_lines - len(self._running)
        if free > 0:
            claimed = await asyncio.to_thread(
                self._store.claim_lines, self.owner, free, self._settings.lease_s, self._settings.max_attempts
            )
            for line in claimed:
                self._running[line.id] = asyncio.get_running_loop().create_task(self._line(line))
        if self._running and now - self._last_renewal >= self._settings.lease_s / 3:
            self._last_renewal = now
            await asyncio.to_thread(self._store.renew, self.owner, list(self._running), self._settings.lease_s)
        batch = await asyncio.to_thread(self._store.claim_finalization, self.owner, self._settings.lease_s)
        if batch is not None:
            await self.finalize(batch)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Run rounds until nothing is left to do (tests)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await self.step()
            if self._running:
                await asyncio.wait(list(self._running.values()), return_when=asyncio.FIRST_COMPLETED)
                continue
            if await asyncio.to_thread(self._store.open_batches) == 0:
                return
            await asyncio.sleep(0.01)
        raise TimeoutError("the batch runner did not finish")

    async def _maintain(self, now: float) -> None:
        expired = await asyncio.to_thread(self._store.expire, now)
        if expired:
            logger.info("batch runner: %d queued line(s) expired", expired)
        for row in await asyncio.to_thread(self._store.expired_files, now):
            try:
                await self._files.delete(row.stored)
            except StorageError as exc:
                logger.warning("could not delete expired file %s: %s", row.id, exc)
                continue
            await asyncio.to_thread(self._store.forget_file, row.seq)
        self._metrics.lines(await asyncio.to_thread(self._store.line_states))

    # -- one line ----------------------------------------------------------------------
    async def _line(self, line: LineRow) -> None:
        try:
            await self.run_line(line)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Recording failed (the database or the file store): the line stays ours until
            # its lease runs out, then runs again and replays its outcome.
            logger.exception("batch %s line %d: could not record its outcome", line.batch_id, line.line_no)
        finally:
            self._running.pop(line.id, None)
            self._wake.set()

    async def run_line(self, line: LineRow) -> None:
        """Serve the line as its endpoint would, and record what it answered."""
        status, body, images, model = await self._serve(line)
        if status is None:  # refused for now: back to the queue
            retry_at = time.time() + self._settings.retry_after_s
            await asyncio.to_thread(self._store.release_line, self.owner, line.id, retry_at)
            return
        output = {
            "id": f"batch_req_{line.id}",
            "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": line.request_id, "body": body},
            "error": None,
        }
        data = (json.dumps(output, separators=(",", ":")) + "\n").encode()
        stored = await self._files.save(f"{line.batch_id}/line-{line.line_no}.jsonl", data, "application/jsonl")
        recorded = await asyncio.to_thread(
            self._store.finish_line,
            self.owner,
            line.id,
            succeeded=status == 200,
            status_code=status,
            images=images,
            result=stored,
        )
        if not recorded:  # another runner took the line (our lease ran out): it records it
            logger.warning("batch %s line %d: lost its claim before recording", line.batch_id, line.line_no)
            try:
                await self._files.delete(stored)
            except StorageError:
                pass
            return
        if model is not None:
            self._metrics.images(model, images)

    async def _serve(self, line: LineRow) -> tuple[int | None, Any, int, str | None]:
        """(status, body, images, model) of the line's answer; status None: try again later."""
        service = self._service
        try:
            key = await asyncio.to_thread(self._accounts.key_by_id, line.key_id)
            body = json.loads(line.body)
            check_batchable(body)
            options = {
                "request_id": line.request_id,
                "base_url": None,
                "idempotency_key": f"batch-line-{line.id}",
                "lane": self._lane,
            }
            if line.endpoint == "/v1/images/edits":
                served = await service.edit(key, body, **options)  # OpenAI's JSON form, as /v1/images/edits
            else:
                served = await service.generate(key, body, **options)
            chunks: list[bytes] = []

            async def keep(data: bytes) -> None:
                chunks.append(data)

            await hand_over(served, keep)
            answer = json.loads(b"".join(chunks))
            return 200, answer, len(answer.get("data") or []), body.get("model")
        except IdempotencyConflict as exc:
            if exc.code == "idempotency_key_in_use":
                return None, None, 0, None  # an earlier attempt's reservation is still open
            return self._failure(exc, line)
        except RETRY_LATER:
            return None, None, 0, None
        except APIError as exc:
            return self._failure(exc, line)
        except Exception as exc:  # noqa: BLE001 - a bug: logged with the request id, a 500 in the file
            return self._failure(exc, line)

    @staticmethod
    def _failure(exc: BaseException, line: LineRow) -> tuple[int, Any, int, None]:
        error, body = error_body(exc, line.request_id)
        return error.status_code, body.model_dump(), 0, None

    # -- the end of a batch --------------------------------------------------------------
    async def finalize(self, batch: BatchRow) -> bool:
        """Write the batch's output file (lines that answered 200) and error file (the
        others, and the lines that never ran), then end it: one transaction records both
        files and the final status, if this runner still holds the batch."""
        outputs: list[bytes] = []
        errors: list[bytes] = []
        lines = await asyncio.to_thread(lambda: list(self._store.done_lines(batch.seq)))
        for line in lines:
            if line.result is not None:
                try:
                    data = await self._files.load(line.result)
                except StorageError:
                    data = self._unrun(line.id, line.custom_id, "batch_output_lost", "The request's output was lost.")
                    errors.append(data)
                    continue
                (outputs if line.state == "succeeded" else errors).append(data)
            else:
                code, message = UNRUN.get(line.state, UNRUN["failed"])
                errors.append(self._unrun(line.id, line.custom_id, code, message))
        output = await self._save_file(batch, "output", outputs)
        error = await self._save_file(batch, "error", errors)
        done = await asyncio.to_thread(self._store.complete, self.owner, batch, output, error)
        if not done:  # another runner took it over: its files count, not these
            for row in (output, error):
                if row is not None:
                    await self._forget(row.stored)
            return False
        for line in lines:
            if line.result is not None:
                await self._forget(line.result)
        logger.info("batch %s ended: %d output line(s), %d error line(s)", batch.id, len(outputs), len(errors))
        return True

    @staticmethod
    def _unrun(line_id: int, custom_id: str, code: str, message: str) -> bytes:
        entry = {
            "id": f"batch_req_{line_id}",
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
        return (json.dumps(entry, separators=(",", ":")) + "\n").encode()

    async def _save_file(self, batch: BatchRow, kind: str, lines: list[bytes]) -> FileRow | None:
        if not lines:
            return None
        data = b"".join(lines)
        file_id = new_id("file-")
        stored = await self._files.save(f"{file_id}.jsonl", data, "application/jsonl")
        now = time.time()
        return FileRow(
            id=file_id,
            key_id=batch.key_id,
            filename=f"{batch.id}_{kind}.jsonl",
            purpose="batch_output",
            bytes=len(data),
            created_at=now,
            expires_at=now + self._config.files.retention_s,
            stored=stored,
            lines=len(lines),
        )

    async def _forget(self, stored: str) -> None:
        try:
            await self._files.delete(stored)
        except StorageError:
            pass


__all__ = ["BatchMetrics", "BatchRunner"]
