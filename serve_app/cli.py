"""``imagegen``: the operator's tool for API keys and credits.

    imagegen [--config serve_config.yaml] keys create --name NAME --credits N [--models a,b] [--rpm N] [--ipm N]
    imagegen keys list [--json]
    imagegen keys revoke NAME
    imagegen credits add NAME N
    imagegen usage [NAME] [--json]
    imagegen reservations release-stale [--older-than SECONDS]
    imagegen db upgrade
    imagegen batches list [--key NAME] [--status STATUS] [--limit N] [--json]
    imagegen batches show BATCH_ID [--json]
    imagegen batches cancel BATCH_ID

The database is SQLite (``sqlite:///path``) or PostgreSQL (``postgresql+psycopg://...``);
every command first brings its schema to this release's (Alembic revisions shipped in the
package), and ``db upgrade`` does only that.

The database is the one the service uses: ``IMAGEGEN_DATABASE_URL`` if set, otherwise
``accounts.database_url`` of the config file. ``keys create`` prints the new key once, as
the last line of its output. Errors are one line on stderr; exit status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

DEFAULT_CONFIG = "serve_config.yaml"
ENV_DATABASE_URL = "IMAGEGEN_DATABASE_URL"


class CLIError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


# -- argument types ----------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _model_list(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise argparse.ArgumentTypeError("expected a comma-separated list of model ids")
    return models


def build_parser() -> argparse.ArgumentParser:
    config_help = f"service config file (default ./{DEFAULT_CONFIG}); ${ENV_DATABASE_URL} overrides its database"
    parser = _Parser(prog="imagegen", description="Manage API keys and credits of the image generation service.")
    parser.add_argument("--config", default=None, help=config_help)
    # --config is also accepted after the command: leaves default to SUPPRESS so they
    # never overwrite a value given before the command.
    leaf = _Parser(add_help=False)
    leaf.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_commands = keys.add_subparsers(dest="action", required=True, parser_class=_Parser)
    create = key_commands.add_parser("create", parents=[leaf], help="create a key; prints it once, last")
    create.add_argument("--name", required=True)
    create.add_argument("--credits", required=True, help="initial credits (decimal, e.g. 100 or 12.5)")
    create.add_argument("--models", type=_model_list, default=None, help="comma-separated model ids (default: all)")
    create.add_argument("--rpm", type=_positive_int, default=None, help="requests per minute (default: config)")
    create.add_argument("--ipm", type=_positive_int, default=None, help="images per minute (default: config)")
    create.add_argument(
        "--allow-disable-safety-checker",
        action="store_true",
        help="let this key send disable_safety_checker: true (default: no; a 403 for the key)",
    )
    create.set_defaults(handler=cmd_keys_create)
    listing = key_commands.add_parser("list", parents=[leaf], help="list keys (never shows key material)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=cmd_keys_list)
    revoke = key_commands.add_parser("revoke", parents=[leaf], help="revoke a key, immediately and for good")
    revoke.add_argument("name")
    revoke.set_defaults(handler=cmd_keys_revoke)
    safety = key_commands.add_parser(
        "safety-checker", parents=[leaf], help="whether a key may turn the safety checker off per request"
    )
    safety.add_argument("name")
    safety.add_argument("permission", choices=["allow-disable", "deny-disable"])
    safety.set_defaults(handler=cmd_keys_safety_checker)

    credits = commands.add_parser("credits", help="add credits to a key")
    credit_commands = credits.add_subparsers(dest="action", required=True, parser_class=_Parser)
    add = credit_commands.add_parser("add", parents=[leaf], help="add credits (a 'credit' ledger row)")
    add.add_argument("name")
    add.add_argument("amount", help="credits to add (decimal, > 0)")
    add.set_defaults(handler=cmd_credits_add)

    usage = commands.add_parser("usage", parents=[leaf], help="balance and usage by model")
    usage.add_argument("name", nargs="?", default=None, help="one key (default: every key)")
    usage.add_argument("--json", action="store_true", help="machine-readable output")
    usage.set_defaults(handler=cmd_usage)

    reservations = commands.add_parser("reservations", help="maintenance of credit reservations")
    reservation_commands = reservations.add_subparsers(dest="action", required=True, parser_class=_Parser)
    stale = reservation_commands.add_parser(
        "release-stale", parents=[leaf], help="refund reservations left open by a replica that died"
    )
    stale.add_argument(
        "--older-than",
        type=_positive_int,
        default=None,
        metavar="SECONDS",
        help="only reservations open longer than this (default: accounts.release_stale_after_s of the config; "
        "never less than the longest model timeout_s, when a request may still deliver)",
    )
    stale.set_defaults(handler=cmd_release_stale)

    batches = commands.add_parser("batches", help="Batch API batches of every key")
    batch_commands = batches.add_subparsers(dest="action", required=True, parser_class=_Parser)
    blist = batch_commands.add_parser("list", parents=[leaf], help="batches, newest first")
    blist.add_argument("--key", default=None, metavar="NAME", help="only this key's batches")
    blist.add_argument("--status", default=None, help="only batches in this status (in_progress, completed, ...)")
    blist.add_argument("--limit", type=_positive_int, default=20)
    blist.add_argument("--json", action="store_true", help="machine-readable output")
    blist.set_defaults(handler=cmd_batches_list)
    bshow = batch_commands.add_parser("show", parents=[leaf], help="one batch, with its request counts")
    bshow.add_argument("batch_id")
    bshow.add_argument("--json", action="store_true", help="machine-readable output (OpenAI's Batch object)")
    bshow.set_defaults(handler=cmd_batches_show)
    bcancel = batch_commands.add_parser(
        "cancel", parents=[leaf], help="cancel a batch: lines not started never run; running ones finish"
    )
    bcancel.add_argument("batch_id")
    bcancel.set_defaults(handler=cmd_batches_cancel)

    database = commands.add_parser("db", help="the accounts database itself")
    database_commands = database.add_subparsers(dest="action", required=True, parser_class=_Parser)
    upgrade = database_commands.add_parser(
        "upgrade", parents=[leaf], help="apply the schema migrations of this release (also done at startup)"
    )
    upgrade.set_defaults(handler=cmd_db_upgrade)
    return parser


# -- context: database + config ----------------------------------------------------------
class Context:
    def __init__(self, config_arg: str | None) -> None:
        from serve_app.config import AccountsConfig

        self.app_config = None
        path = Path(config_arg or DEFAULT_CONFIG)
        if path.exists():
            self.app_config = _load_config(path)
        elif config_arg is not None or not os.environ.get(ENV_DATABASE_URL):
            raise CLIError(f"no config file at {path}: pass --config PATH or set {ENV_DATABASE_URL}")
        self.accounts_config = self.app_config.accounts if self.app_config else AccountsConfig()
        self.database_url = self.accounts_config.resolved_database_url()
        self._store = None

    @property
    def model_ids(self) -> list[str] | None:
        return [m.id for m in self.app_config.models] if self.app_config else None

    @property
    def store(self):
        if self._store is None:
            from serve_app.accounts.store import open_store

            try:
                self._store = open_store(self.database_url)
            except ValueError as exc:
                raise CLIError(str(exc)) from None
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _load_config(path: Path):
    from pydantic import ValidationError

    from serve_app.config import load_app_config

    try:
        return load_app_config(path)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "args"
        raise CLIError(f"invalid config {path}: {where}: {first.get('msg')}") from None
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read config {path}: {exc}") from None


# -- commands ----------------------------------------------------------------------------
def _credits(units: int) -> str:
    from serve_app.accounts.units import format_credits

    return format_credits(units)


def _limits(ctx: Context, key) -> tuple[str, str]:
    rpm = str(key.rpm) if key.rpm else f"{ctx.accounts_config.default_requests_per_minute} (default)"
    ipm = str(key.ipm) if key.ipm else f"{ctx.accounts_config.default_images_per_minute} (default)"
    return rpm, ipm


def _models(key) -> str:
    return "all" if key.allowed_models is None else ",".join(sorted(key.allowed_models))


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def cmd_keys_create(ctx: Context, args: argparse.Namespace) -> None:
    from serve_app.accounts.keys import validate_key_name
    from serve_app.accounts.store import issue_key
    from serve_app.accounts.units import parse_credits

    validate_key_name(args.name)
    try:
        units = parse_credits(args.credits)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.models is not None and ctx.model_ids is not None:
        unknown = [m for m in args.models if m not in ctx.model_ids]
        if unknown:
            raise CLIError(f"unknown model id(s) {', '.join(unknown)}; the config has: {', '.join(ctx.model_ids)}")
    issued = issue_key(
        ctx.store,
        args.name,
        credits_units=units,
        allowed_models=args.models,
        rpm=args.rpm,
        ipm=args.ipm,
        may_disable_safety_checker=args.allow_disable_safety_checker,
    )
    key = issued.record
    rpm, ipm = _limits(ctx, key)
    print(
        f"Created key '{key.name}' (id {key.id}): {_credits(key.balance_units)} credits, "
        f"models: {_models(key)}, requests/min: {rpm}, images/min: {ipm}, "
        f"may disable the safety checker: {'yes' if key.may_disable_safety_checker else 'no'}."
    )
    print("Store this API key now; it cannot be shown again:")
    print(issued.secret)


def cmd_keys_list(ctx: Context, args: argparse.Namespace) -> None:
    keys = ctx.store.list_keys()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": k.name,
                        "id": k.id,
                        "balance": _credits(k.balance_units),
                        "models": None if k.allowed_models is None else sorted(k.allowed_models),
                        "rpm": k.rpm or ctx.accounts_config.default_requests_per_minute,
                        "ipm": k.ipm or ctx.accounts_config.default_images_per_minute,
                        "created": k.created,
                        "revoked_at": k.revoked_at,
                        "may_disable_safety_checker": k.may_disable_safety_checker,
                    }
                    for k in keys
                ],
                indent=2,
            )
        )
        return
    if not keys:
        print("No keys yet. Create one with: imagegen keys create --name NAME --credits N")
        return
    rows = [("NAME", "BALANCE", "MODELS", "RPM", "IPM", "CREATED", "STATUS")]
    for k in keys:
        rpm, ipm = _limits(ctx, k)
        status = f"revoked {_when(k.revoked_at)}" if k.revoked else "active"
        rows.append((k.name, _credits(k.balance_units), _models(k), rpm, ipm, _when(k.created), status))
    _table(rows)


def cmd_keys_revoke(ctx: Context, args: argparse.Namespace) -> None:
    before = ctx.store.key_by_name(args.name)
    key = ctx.store.revoke_key(args.name)
    if before.revoked:
        print(f"Key '{key.name}' was already revoked ({_when(key.revoked_at)}).")
    else:
        print(f"Revoked key '{key.name}'. Requests with it fail with 401 within a couple of seconds.")


def cmd_keys_safety_checker(ctx: Context, args: argparse.Namespace) -> None:
    key = ctx.store.set_safety_permission(args.name, args.permission == "allow-disable")
    verdict = "may now" if key.may_disable_safety_checker else "may no longer"
    print(f"Key '{key.name}' {verdict} send disable_safety_checker: true (within a couple of seconds).")


def cmd_credits_add(ctx: Context, args: argparse.Namespace) -> None:
    from serve_app.accounts.units import parse_credits

    try:
        units = parse_credits(args.amount, allow_zero=False)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    key = ctx.store.add_credits(args.name, units)
    print(f"Added {_credits(units)} credits to '{key.name}': balance {_credits(key.balance_units)}.")


def cmd_usage(ctx: Context, args: argparse.Namespace) -> None:
    keys = [ctx.store.key_by_name(args.name)] if args.name else ctx.store.list_keys()
    usages = [ctx.store.usage(k.id) for k in keys]
    if args.json:
        print(json.dumps([u.as_json() for u in usages], indent=2))
        return
    if not usages:
        print("No keys yet.")
        return
    for i, (key, usage) in enumerate(zip(keys, usages)):
        if i:
            print()
        status = " (revoked)" if key.revoked else ""
        print(
            f"{usage.key_name}{status}: balance {_credits(usage.balance_units)} credits, "
            f"{_credits(usage.reserved_units)} reserved by requests in flight"
        )
        if not usage.by_model:
            print("  no images delivered yet")
            continue
        rows = [("  MODEL", "REQUESTS", "IMAGES", "CREDITS")]
        rows += [(f"  {m.model}", str(m.requests), str(m.images), _credits(m.credits_units)) for m in usage.by_model]
        rows.append(
            ("  total", str(sum(m.requests for m in usage.by_model)), str(usage.images), _credits(usage.credits_units))
        )
        _table(rows)


def cmd_release_stale(ctx: Context, args: argparse.Namespace) -> None:
    from serve_app.config import ModelConfig, default_stale_after_s

    config = ctx.app_config
    # A request can deliver (and be charged) until its deadlines have passed: refunding a
    # younger reservation would give away the images it is about to deliver.
    longest = config.longest_request_s if config else ModelConfig.model_fields["timeout_s"].default
    older_than = (
        args.older_than
        if args.older_than is not None
        else (config.stale_reservation_after_s if config else default_stale_after_s(longest))
    )
    if older_than <= longest:
        raise CLIError(
            f"--older-than {older_than:g} s: a request that young may still be running (the longest model "
            f"timeout_s, plus the prompt enhancer's, is {longest:g} s); refunding it would give its images away"
        )
    released = ctx.store.release_stale(older_than)
    total = sum(s.refunded_units for s in released)
    print(f"Released {len(released)} stale reservation(s), refunding {_credits(total)} credits.")


def _batch_store(ctx: Context):
    from serve_app.batches.store import BatchStore

    return BatchStore(ctx.store)


def _batch_row(ctx: Context, batch, names: dict[int, str]) -> tuple[str, ...]:
    counts = batch.counts
    done = counts.completed + counts.failed
    return (
        batch.id,
        names.get(batch.key_id, str(batch.key_id)),
        batch.status,
        f"{done}/{counts.total}",
        str(counts.failed),
        _when(batch.created_at),
    )


def cmd_batches_list(ctx: Context, args: argparse.Namespace) -> None:
    from serve_app.batches.service import batch_object

    key_id = ctx.store.key_by_name(args.key).id if args.key else None
    rows, more = _batch_store(ctx).list_batches(key_id, after=None, limit=args.limit, status=args.status)
    if args.json:
        print(json.dumps([batch_object(row).model_dump(mode="json") for row in rows], indent=2))
        return
    if not rows:
        print("No batches.")
        return
    names = {k.id: k.name for k in ctx.store.list_keys()}
    _table([("BATCH", "KEY", "STATUS", "DONE", "FAILED", "CREATED"), *(_batch_row(ctx, row, names) for row in rows)])
    if more:
        print(f"(more than {args.limit}; raise --limit)")


def cmd_batches_show(ctx: Context, args: argparse.Namespace) -> None:
    from serve_app.batches.service import batch_object

    batch = _batch_store(ctx).batch(None, args.batch_id)
    if batch is None:
        raise CLIError(f"no batch {args.batch_id!r}")
    if args.json:
        print(json.dumps(batch_object(batch).model_dump(mode="json"), indent=2))
        return
    key = ctx.store.key_by_id(batch.key_id)
    counts = batch.counts
    print(f"{batch.id} ({batch.endpoint}) of key '{key.name}': {batch.status}")
    print(f"  requests: {counts.total} total, {counts.completed} completed, {counts.failed} failed")
    for label, value in (
        ("created", batch.created_at),
        ("expires", batch.expires_at),
        ("in progress", batch.in_progress_at),
        ("finalizing", batch.finalizing_at),
        ("completed", batch.completed_at),
        ("cancelling", batch.cancelling_at),
        ("cancelled", batch.cancelled_at),
        ("expired", batch.expired_at),
        ("failed", batch.failed_at),
    ):
        if value is not None:
            print(f"  {label}: {_when(value)}")
    for label, file_id in (
        ("input file", batch.input_file_id),
        ("output file", batch.output_file_id),
        ("error file", batch.error_file_id),
    ):
        if file_id is not None:
            print(f"  {label}: {file_id}")
    for error in batch.errors or []:
        print(f"  error (line {error.get('line')}): {error.get('message')}")


def cmd_batches_cancel(ctx: Context, args: argparse.Namespace) -> None:
    batch = _batch_store(ctx).cancel(None, args.batch_id)
    if batch is None:
        raise CLIError(f"no batch {args.batch_id!r}")
    if batch.status == "cancelling":
        print(f"Cancelling {batch.id}: lines not started will not run; it ends once its running lines finish.")
    else:
        print(f"Batch {batch.id} is {batch.status}; nothing to cancel.")


def cmd_db_upgrade(ctx: Context, args: argparse.Namespace) -> None:
    from serve_app.accounts.migrate import upgrade
    from serve_app.accounts.store import create_engine

    engine = create_engine(ctx.database_url)
    try:
        found, now = upgrade(engine)
    finally:
        engine.dispose()
    where = engine.url.render_as_string(hide_password=True)
    if found == now:
        print(f"The accounts database {where} is at the newest schema revision, {now}.")
    else:
        print(f"Upgraded the accounts database {where} from revision {found or '(empty)'} to {now}.")


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# -- entry point -------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from serve_app.accounts.errors import AccountsError

    args = build_parser().parse_args(argv)
    ctx = None
    try:
        ctx = Context(args.config)
        args.handler(ctx, args)
    except BrokenPipeError:  # `imagegen keys list | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except (CLIError, AccountsError) as exc:
        print(f"imagegen: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"imagegen: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for the operator
        print(f"imagegen: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if ctx is not None:
            ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
