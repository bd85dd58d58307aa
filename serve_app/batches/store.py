"""The Batch API's rows: files, batches and batch lines, on the accounts database.

Blocking and thread-safe like ``AccountStore`` (whose engine and write transactions it
shares). Every write that races another runner is one conditional statement:

- a line is claimed with ``UPDATE ... WHERE state = 'queued' AND not_before <= now`` (or a
  running line whose lease ran out: its runner died), setting ``owner`` and ``lease_until``;
  the runner renews the lease while the line runs;
- a line's outcome is recorded with ``UPDATE ... WHERE owner = me AND state = 'running'``:
  a runner that lost its claim (its lease ran out meanwhile) records nothing, and whoever
  runs the line next replays its charged outcome (the line's Idempotency-Key claim) rather
  than charging it again;
- a batch's output files are assembled by the runner that claims the batch the same way.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from serve_app.accounts.schema import batch_lines, batches, files
from serve_app.accounts.store import AccountStore

# Lines that still have work to do; the others are done for good.
LIVE_STATES = ("queued", "running")
DONE_STATES = ("succeeded", "failed", "cancelled", "expired")
# Statuses in which a batch's lines may run or end.
ACTIVE_STATUSES = ("in_progress", "cancelling")


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass(frozen=True)
class FileRow:
    id: str
    key_id: int
    filename: str
    purpose: str
    bytes: int
    created_at: float
    expires_at: float | None
    stored: str
    lines: int | None = None
    seq: int = 0


@dataclass(frozen=True)
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class BatchRow:
    seq: int
    id: str
    key_id: int
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: float
    expires_at: float
    model: str | None = None
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    counts: RequestCounts = field(default_factory=RequestCounts)


@dataclass(frozen=True)
class NewLine:
    line_no: int
    custom_id: str
    body: str


@dataclass(frozen=True)
class LineRow:
    """A claimed line, as its runner sees it."""

    id: int
    batch_id: str
    batch_seq: int
    key_id: int
    endpoint: str
    line_no: int
    custom_id: str
    body: str
    request_id: str
    attempts: int


@dataclass(frozen=True)
class DoneLine:
    line_no: int
    custom_id: str
    state: str
    request_id: str
    result: str | None
    id: int


_BATCH_TIMES = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


class BatchStore:
    def __init__(self, accounts: AccountStore) -> None:
        self._accounts = accounts
        self.engine = accounts.engine

    def _write(self):
        return self._accounts._write()  # one write lock with the ledger (SQLite)

    # -- files -----------------------------------------------------------------------
    @staticmethod
    def _file(row: Any) -> FileRow:
        return FileRow(
            id=row.id,
            key_id=row.key_id,
            filename=row.filename,
            purpose=row.purpose,
            bytes=int(row.bytes),
            created_at=row.created_at,
            expires_at=row.expires_at,
            stored=row.stored,
            lines=row.lines,
            seq=row.seq,
        )

    def add_file(self, file: FileRow) -> FileRow:
        with self._write() as conn:
            seq = conn.execute(
                sa.insert(files).values(
                    id=file.id,
                    key_id=file.key_id,
                    filename=file.filename,
                    purpose=file.purpose,
                    bytes=file.bytes,
                    lines=file.lines,
                    created_at=file.created_at,
                    expires_at=file.expires_at,
                    stored=file.stored,
                )
            ).inserted_primary_key[0]
        return FileRow(**{**file.__dict__, "seq": seq})

    def file(self, key_id: int, file_id: str) -> FileRow | None:
        """The key's file (None when there is none, or it is another key's)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(files).where(files.c.id == file_id, files.c.key_id == key_id)).first()
        return None if row is None else self._file(row)

    def list_files(
        self, key_id: int, *, after: str | None, limit: int, descending: bool, purpose: str | None
    ) -> tuple[list[FileRow], bool]:
        """A page of the key's files and whether more follow."""
        query = sa.select(files).where(files.c.key_id == key_id)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        with self.engine.connect() as conn:
            if after is not None:
                cursor = conn.execute(
                    sa.select(files.c.seq).where(files.c.id == after, files.c.key_id == key_id)
                ).scalar_one_or_none()
                if cursor is not None:
                    query = query.where(files.c.seq < cursor if descending else files.c.seq > cursor)
            order = files.c.seq.desc() if descending else files.c.seq.asc()
            rows = conn.execute(query.order_by(order).limit(limit + 1)).all()
        return [self._file(row) for row in rows[:limit]], len(rows) > limit

    def delete_file(self, key_id: int, file_id: str) -> FileRow | None:
        """Remove the key's file row; returns it (its object is the caller's to delete)."""
        with self._write() as conn:
            row = conn.execute(sa.select(files).where(files.c.id == file_id, files.c.key_id == key_id)).first()
            if row is None:
                return None
            conn.execute(sa.delete(files).where(files.c.seq == row.seq))
        return self._file(row)

    def expired_files(self, now: float, limit: int = 100) -> list[FileRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(files).where(files.c.expires_at < now).order_by(files.c.expires_at).limit(limit)
            ).all()
        return [self._file(row) for row in rows]

    def forget_file(self, seq: int) -> None:
        with self._write() as conn:
            conn.execute(sa.delete(files).where(files.c.seq == seq))

    # -- batches -----------------------------------------------------------------------
    def _counts(self, conn: sa.Connection, seqs: Sequence[int]) -> dict[int, RequestCounts]:
        if not seqs:
            return {}
        rows = conn.execute(
            sa.select(batch_lines.c.batch_seq, batch_lines.c.state, sa.func.count())
            .where(batch_lines.c.batch_seq.in_(list(seqs)))
            .group_by(batch_lines.c.batch_seq, batch_lines.c.state)
        ).all()
        totals: dict[int, dict[str, int]] = {}
        for seq, state, count in rows:
            totals.setdefault(seq, {})[state] = int(count)
        return {
            seq: RequestCounts(
                total=sum(states.values()),
                completed=states.get("succeeded", 0),
                failed=states.get("failed", 0) + states.get("cancelled", 0) + states.get("expired", 0),
            )
            for seq, states in totals.items()
        }

    @staticmethod
    def _batch(row: Any, counts: RequestCounts | None) -> BatchRow:
        return BatchRow(
            seq=row.seq,
            id=row.id,
            key_id=row.key_id,
            endpoint=row.endpoint,
            input_file_id=row.input_file_id,
            completion_window=row.completion_window,
            status=row.status,
            created_at=row.created_at,
            expires_at=row.expires_at,
            model=row.model,
            metadata=None if row.metadata is None else json.loads(row.metadata),
            errors=None if row.errors is None else json.loads(row.errors),
            output_file_id=row.output_file_id,
            error_file_id=row.error_file_id,
            counts=counts or RequestCounts(),
            **{name: getattr(row, name) for name in _BATCH_TIMES},
        )

    def create_batch(
        self,
        *,
        key_id: int,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        expires_at: float,
        metadata: dict[str, str] | None,
        model: str | None,
        lines: Sequence[NewLine],
        errors: list[dict[str, Any]] | None = None,
    ) -> BatchRow:
        """A batch and its lines in one transaction: ``in_progress``, or ``failed`` with
        ``errors`` (and no lines) when its input cannot run."""
        now = time.time()
        batch_id = new_id("batch_")
        status = "failed" if errors else "in_progress"
        with self._write() as conn:
            seq = conn.execute(
                sa.insert(batches).values(
                    id=batch_id,
                    key_id=key_id,
                    endpoint=endpoint,
                    input_file_id=input_file_id,
                    completion_window=completion_window,
                    status=status,
                    model=model,
                    metadata=None if metadata is None else json.dumps(metadata),
                    errors=json.dumps(errors) if errors else None,
                    created_at=now,
                    expires_at=expires_at,
                    in_progress_at=None if errors else now,
                    failed_at=now if errors else None,
                )
            ).inserted_primary_key[0]
            if not errors:
                for start in range(0, len(lines), 1000):
                    conn.execute(
                        sa.insert(batch_lines),
                        [
                            {
                                "batch_seq": seq,
                                "line_no": line.line_no,
                                "custom_id": line.custom_id,
                                "body": line.body,
                                "request_id": f"req_{secrets.token_hex(16)}",
                                "state": "queued",
                                "not_before": 0.0,
                                "attempts": 0,
                                "images": 0,
                            }
                            for line in lines[start : start + 1000]
                        ],
                    )
        found = self.batch(key_id, batch_id)
        assert found is not None
        return found

    def batch(self, key_id: int | None, batch_id: str) -> BatchRow | None:
        """The key's batch (any key's with ``key_id`` None: operators)."""
        query = sa.select(batches).where(batches.c.id == batch_id)
        if key_id is not None:
            query = query.where(batches.c.key_id == key_id)
        with self._accounts._snapshot() as conn:
            row = conn.execute(query).first()
            if row is None:
                return None
            return self._batch(row, self._counts(conn, [row.seq]).get(row.seq))

    def list_batches(
        self, key_id: int | None, *, after: str | None, limit: int, status: str | None = None
    ) -> tuple[list[BatchRow], bool]:
        """A page of batches, newest first, and whether more follow."""
        query = sa.select(batches)
        if key_id is not None:
            query = query.where(batches.c.key_id == key_id)
        if status is not None:
            query = query.where(batches.c.status == status)
        with self._accounts._snapshot() as conn:
            if after is not None:
                cursor_query = sa.select(batches.c.seq).where(batches.c.id == after)
                if key_id is not None:
                    cursor_query = cursor_query.where(batches.c.key_id == key_id)
                cursor = conn.execute(cursor_query).scalar_one_or_none()
                if cursor is not None:
                    query = query.where(batches.c.seq < cursor)
            rows = conn.execute(query.order_by(batches.c.seq.desc()).limit(limit + 1)).all()
            counts = self._counts(conn, [row.seq for row in rows[:limit]])
        return [self._batch(row, counts.get(row.seq)) for row in rows[:limit]], len(rows) > limit

    def cancel(self, key_id: int | None, batch_id: str) -> BatchRow | None:
        """``cancelling``: lines not started are cancelled now (never charged), running ones
        finish; the runner then writes the files and makes it ``cancelled``. A batch that
        already ended is returned as it is."""
        now = time.time()
        b = batches.c
        where = [b.id == batch_id] if key_id is None else [b.id == batch_id, b.key_id == key_id]
        with self._write() as conn:
            seq = conn.execute(
                sa.update(batches)
                .where(*where, b.status.in_(("validating", "in_progress")))
                .values(status="cancelling", cancelling_at=now)
                .returning(b.seq)
            ).scalar_one_or_none()
            if seq is not None:
                conn.execute(
                    sa.update(batch_lines)
                    .where(batch_lines.c.batch_seq == seq, batch_lines.c.state == "queued")
                    .values(state="cancelled", finished_at=now)
                )
        return self.batch(key_id, batch_id)

    # -- the runner --------------------------------------------------------------------
    def expire(self, now: float) -> int:
        """Queued lines of batches past their completion window: ``expired`` (never run,
        never charged). Returns how many."""
        overdue = sa.select(batches.c.seq).where(batches.c.status == "in_progress", batches.c.expires_at < now)
        with self._write() as conn:
            return conn.execute(
                sa.update(batch_lines)
                .where(batch_lines.c.state == "queued", batch_lines.c.batch_seq.in_(overdue.scalar_subquery()))
                .values(state="expired", finished_at=now)
            ).rowcount

    def claim_lines(self, owner: str, limit: int, lease_s: float, max_attempts: int) -> list[LineRow]:
        """Up to ``limit`` lines for ``owner``, oldest batch first: queued ones whose wait is
        over, and running ones whose lease ran out (their runner died). A line claimed
        ``max_attempts`` times already fails instead (it keeps killing its runner)."""
        if limit <= 0:
            return []
        now = time.time()
        l, b = batch_lines.c, batches.c
        claimable = sa.or_(
            sa.and_(l.state == "queued", l.not_before <= now),
            sa.and_(l.state == "running", l.lease_until < now),
        )
        query = (
            sa.select(l.id, l.attempts)
            .join(batches, b.seq == l.batch_seq)
            .where(b.status.in_(ACTIVE_STATUSES), claimable)
            .order_by(l.batch_seq, l.line_no)
            .limit(limit)
        )
        claimed: list[int] = []
        with self.engine.connect() as conn:
            candidates = conn.execute(query).all()
        if not candidates:
            return []
        with self._write() as conn:
            for line_id, attempts in candidates:
                if attempts >= max_attempts:
                    conn.execute(
                        sa.update(batch_lines)
                        .where(l.id == line_id, claimable)
                        .values(state="failed", owner=None, status_code=500, finished_at=now)
                    )
                    continue
                won = conn.execute(
                    sa.update(batch_lines)
                    .where(l.id == line_id, claimable)
                    .values(state="running", owner=owner, lease_until=now + lease_s, attempts=l.attempts + 1)
                ).rowcount
                if won == 1:
                    claimed.append(line_id)
            if not claimed:
                return []
            rows = conn.execute(
                sa.select(
                    l.id,
                    b.id.label("batch_id"),
                    l.batch_seq,
                    b.key_id,
                    b.endpoint,
                    l.line_no,
                    l.custom_id,
                    l.body,
                    l.request_id,
                    l.attempts,
                )
                .join(batches, b.seq == l.batch_seq)
                .where(l.id.in_(claimed))
                .order_by(l.batch_seq, l.line_no)
            ).all()
        return [LineRow(*row) for row in rows]

    def renew(self, owner: str, line_ids: Sequence[int], lease_s: float) -> int:
        """Extend the leases of ``owner``'s running lines; returns how many it still holds."""
        if not line_ids:
            return 0
        l = batch_lines.c
        with self._write() as conn:
            return conn.execute(
                sa.update(batch_lines)
                .where(l.id.in_(list(line_ids)), l.owner == owner, l.state == "running")
                .values(lease_until=time.time() + lease_s)
            ).rowcount

    def finish_line(
        self, owner: str, line_id: int, *, succeeded: bool, status_code: int, images: int, result: str
    ) -> bool:
        """Record a line's outcome, if ``owner`` still holds it. False: it lost the claim
        (its lease ran out) and records nothing."""
        l = batch_lines.c
        with self._write() as conn:
            return (
                conn.execute(
                    sa.update(batch_lines)
                    .where(l.id == line_id, l.owner == owner, l.state == "running")
                    .values(
                        state="succeeded" if succeeded else "failed",
                        status_code=status_code,
                        images=images,
                        result=result,
                        finished_at=time.time(),
                        owner=None,
                        lease_until=None,
                    )
                ).rowcount
                == 1
            )

    def release_line(self, owner: str, line_id: int, retry_at: float) -> bool:
        """Give a claimed line back to run again at ``retry_at`` (a refusal for now); one of
        a batch being cancelled is cancelled instead."""
        l, b = batch_lines.c, batches.c
        cancelling = sa.select(b.status).where(b.seq == l.batch_seq).scalar_subquery() == "cancelling"
        with self._write() as conn:
            return (
                conn.execute(
                    sa.update(batch_lines)
                    .where(l.id == line_id, l.owner == owner, l.state == "running")
                    .values(
                        state=sa.case((cancelling, "cancelled"), else_="queued"),
                        attempts=l.attempts - 1,  # a refusal for now is not a failed attempt
                        owner=None,
                        lease_until=None,
                        not_before=retry_at,
                    )
                ).rowcount
                == 1
            )

    def claim_finalization(self, owner: str, lease_s: float) -> BatchRow | None:
        """A batch whose lines are all done and whose files are not written yet (or whose
        writer's lease ran out), claimed by ``owner``: ``in_progress`` becomes ``finalizing``."""
        now = time.time()
        b, l = batches.c, batch_lines.c
        live = sa.exists().where(l.batch_seq == b.seq, l.state.in_(LIVE_STATES))
        free = sa.or_(b.owner.is_(None), b.lease_until < now)
        ready = sa.and_(b.status.in_(("in_progress", "cancelling", "finalizing")), ~live, free)
        with self.engine.connect() as conn:
            candidate = conn.execute(sa.select(b.seq, b.key_id, b.id).where(ready).order_by(b.seq).limit(1)).first()
        if candidate is None:
            return None
        with self._write() as conn:
            won = conn.execute(
                sa.update(batches)
                .where(b.seq == candidate.seq, ready)
                .values(
                    owner=owner,
                    lease_until=now + lease_s,
                    status=sa.case((b.status == "in_progress", "finalizing"), else_=b.status),
                    finalizing_at=sa.case((b.status == "in_progress", now), else_=b.finalizing_at),
                )
            ).rowcount
        if won != 1:
            return None
        return self.batch(None, candidate.id)

    def done_lines(self, batch_seq: int) -> Iterator[DoneLine]:
        l = batch_lines.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(l.line_no, l.custom_id, l.state, l.request_id, l.result, l.id)
                .where(l.batch_seq == batch_seq)
                .order_by(l.line_no)
            ).all()
        for row in rows:
            yield DoneLine(*row)

    def complete(self, owner: str, batch: BatchRow, output: FileRow | None, error: FileRow | None) -> bool:
        """The batch's end, with its files, in one transaction, if ``owner`` still holds it:
        ``cancelled`` after a cancel, ``expired`` when lines expired, else ``completed``."""
        now = time.time()
        b = batches.c
        if batch.status == "cancelling":
            final = {"status": "cancelled", "cancelled_at": now}
        elif self._has_expired(batch.seq):
            final = {"status": "expired", "expired_at": now}
        else:
            final = {"status": "completed", "completed_at": now}
        with self._write() as conn:
            won = conn.execute(
                sa.update(batches)
                .where(b.seq == batch.seq, b.owner == owner, b.status == batch.status)
                .values(
                    **final,
                    output_file_id=None if output is None else output.id,
                    error_file_id=None if error is None else error.id,
                    owner=None,
                    lease_until=None,
                )
            ).rowcount
            if won != 1:
                return False
            for row in (output, error):
                if row is not None:
                    conn.execute(
                        sa.insert(files).values(
                            id=row.id,
                            key_id=row.key_id,
                            filename=row.filename,
                            purpose=row.purpose,
                            bytes=row.bytes,
                            lines=row.lines,
                            created_at=row.created_at,
                            expires_at=row.expires_at,
                            stored=row.stored,
                        )
                    )
        return True

    def _has_expired(self, batch_seq: int) -> bool:
        l = batch_lines.c
        with self.engine.connect() as conn:
            return (
                conn.execute(sa.select(l.id).where(l.batch_seq == batch_seq, l.state == "expired").limit(1)).first()
                is not None
            )

    def line_states(self) -> dict[str, int]:
        """Lines by state, over every batch still running (metrics)."""
        l, b = batch_lines.c, batches.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(l.state, sa.func.count())
                .join(batches, b.seq == l.batch_seq)
                .where(b.status.in_(ACTIVE_STATUSES + ("finalizing",)))
                .group_by(l.state)
            ).all()
        return {state: int(count) for state, count in rows}

    def open_batches(self) -> int:
        """Batches not ended yet (lines to run, or files to write)."""
        b = batches.c
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(b.status.in_(ACTIVE_STATUSES + ("finalizing",)))
                ).scalar_one()
            )

    def line_result_names(self, batch_seq: int) -> list[str]:
        l = batch_lines.c
        with self.engine.connect() as conn:
            return list(
                conn.execute(sa.select(l.result).where(l.batch_seq == batch_seq, l.result.is_not(None))).scalars()
            )


__all__ = [
    "ACTIVE_STATUSES",
    "BatchRow",
    "BatchStore",
    "DoneLine",
    "FileRow",
    "LineRow",
    "NewLine",
    "RequestCounts",
    "new_id",
]
