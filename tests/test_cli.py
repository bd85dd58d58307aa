"""The ``imagegen`` operator CLI, run as a subprocess the way an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
applications:
  - name: imagegen
    import_path: serve_app.app:build_app
    args:
      models:
        - id: tiny-sdxl
          family: sdxl
          weights: builtin:tiny-sdxl
          defaults: {size: 64x64, steps: 2}
          price_per_image: "0.5"
        - id: tiny-qwen
          family: qwen-image
          weights: builtin:tiny-qwen-image
          defaults: {size: 64x64, steps: 2}
      accounts:
        database_url: sqlite:///{db}
        default_requests_per_minute: 30
        default_images_per_minute: 90
"""


@pytest.fixture
def env(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "IMAGEGEN_DATABASE_URL"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environment["IMAGEGEN_DATABASE_URL"] = f"sqlite:///{tmp_path / 'db' / 'accounts.db'}"
    # an empty working directory: the repository's own serve_config.yaml must not leak in
    environment["_CWD"] = str(tmp_path / "cwd")
    (tmp_path / "cwd").mkdir()
    return environment


def imagegen(env, *args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "serve_app.cli", *args],
        check=False,
        env=env,
        cwd=cwd or env["_CWD"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(env, *args, cwd=None) -> str:
    result = imagegen(env, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def fails(env, *args, match: str, cwd=None, code: int = 1) -> None:
    result = imagegen(env, *args, cwd=cwd)
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_key_lifecycle(env, tmp_path):
    from serve_app.accounts.keys import hash_key, looks_like_key

    out = ok(env, "keys", "create", "--name", "alice", "--credits", "12.5", "--rpm", "5")
    secret = out.strip().splitlines()[-1]
    assert looks_like_key(secret)
    assert "12.5 credits" in out
    assert (tmp_path / "db" / "accounts.db").exists()  # created on first use, parents too

    ok(env, "keys", "create", "--name", "bob", "--credits", "0", "--models", "m1,m2", "--ipm", "7")
    listing = ok(env, "keys", "list", "--json")
    assert secret not in listing and hash_key(secret) not in listing
    rows = {row["name"]: row for row in json.loads(listing)}
    assert rows["alice"]["balance"] == "12.5" and rows["alice"]["rpm"] == 5 and rows["alice"]["models"] is None
    assert rows["bob"]["models"] == ["m1", "m2"] and rows["bob"]["ipm"] == 7 and rows["bob"]["revoked_at"] is None

    assert "balance 15" in ok(env, "credits", "add", "alice", "2.5")
    usage = json.loads(ok(env, "usage", "alice", "--json"))
    assert usage[0]["balance"] == 15.0 and usage[0]["data"] == []
    assert "Revoked" in ok(env, "keys", "revoke", "bob")
    assert "already revoked" in ok(env, "keys", "revoke", "bob")


def test_text_output(run_main):
    from serve_app.accounts.keys import hash_key

    code, out, _ = run_main("keys", "create", "--name", "bob", "--credits", "2", "--models", "m1,m2")
    secret = out.strip().splitlines()[-1]
    code, listing, _ = run_main("keys", "list")
    assert code == 0 and listing.splitlines()[0].split() == [
        "NAME",
        "BALANCE",
        "MODELS",
        "RPM",
        "IPM",
        "CREATED",
        "STATUS",
    ]
    assert "m1,m2" in listing and secret not in listing and hash_key(secret) not in listing
    run_main("keys", "revoke", "bob")
    assert "revoked" in run_main("keys", "list")[1]
    code, out, _ = run_main("usage")
    assert code == 0 and "alice: balance 1 credits" in out and "bob (revoked): balance 2 credits" in out


def test_bad_input_through_the_real_entry_point(env):
    ok(env, "keys", "create", "--name", "alice", "--credits", "1")
    fails(env, "keys", "create", "--name", "alice", "--credits", "1", match="already exists")
    fails(env, "keys", "create", "--name", "carl", "--credits", "1", "--rpm", "0", match="positive integer", code=2)


# The whole matrix of bad input, in-process (same code, no interpreter start per case).
@pytest.fixture
def run_main(env, monkeypatch, capsys):
    from serve_app import cli

    monkeypatch.setenv("IMAGEGEN_DATABASE_URL", env["IMAGEGEN_DATABASE_URL"])
    monkeypatch.chdir(env["_CWD"])

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    assert run("keys", "create", "--name", "alice", "--credits", "1")[0] == 0
    return run


@pytest.mark.parametrize(
    ("args", "code", "match"),
    [
        (("keys", "create", "--name", "alice", "--credits", "1"), 1, "already exists"),
        (("keys", "create", "--name", "carl", "--credits", "-1"), 1, "must not be negative"),
        (("keys", "create", "--name", "carl", "--credits", "ten"), 1, "decimal number"),
        (("keys", "create", "--name", "carl", "--credits", "0.0000001"), 1, "6 decimal places"),
        (("keys", "create", "--name", "carl", "--credits", "NaN"), 1, "finite"),
        (("keys", "create", "--name", "bad name", "--credits", "1"), 1, "invalid key name"),
        (("keys", "create", "--name", "carl", "--credits", "1", "--rpm", "0"), 2, "positive integer"),
        (("keys", "create", "--name", "carl", "--credits", "1", "--ipm", "x"), 2, "positive integer"),
        (("keys", "create", "--name", "carl", "--credits", "1", "--models", ","), 2, "comma-separated"),
        (("keys", "create", "--credits", "1"), 2, "--name"),
        (("credits", "add", "nobody", "1"), 1, "no key named 'nobody'"),
        (("credits", "add", "alice", "-3"), 1, "must not be negative"),
        (("credits", "add", "alice", "0"), 1, "greater than zero"),
        (("credits", "add", "alice", "1e400x"), 1, "decimal number"),
        (("keys", "revoke", "nobody"), 1, "no key named"),
        (("usage", "nobody"), 1, "no key named"),
        (("keys",), 2, "required"),
        (("frobnicate",), 2, "invalid choice"),
        # A reservation that young may belong to a request still running (the default
        # model timeout_s is 300 s): refunding it would give its images away.
        (("reservations", "release-stale", "--older-than", "1"), 1, "may still be running"),
        (("reservations", "release-stale", "--older-than", "300"), 1, "may still be running"),
    ],
)
def test_bad_input_gives_one_line_errors(run_main, args, code, match):
    result, out, err = run_main(*args)
    assert result == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], err
    assert "qbt_" not in out + err


def test_a_revoked_key_gets_no_credits(run_main):
    assert run_main("keys", "revoke", "alice")[0] == 0
    code, _, err = run_main("credits", "add", "alice", "1")
    assert code == 1 and "revoked" in err


def test_config_file_gives_database_defaults_and_model_ids(env, tmp_path):
    db = tmp_path / "from-config.db"
    (tmp_path / "serve_config.yaml").write_text(CONFIG.replace("{db}", str(db)))
    env = {k: v for k, v in env.items() if k != "IMAGEGEN_DATABASE_URL"}

    # ./serve_config.yaml by default
    out = ok(env, "keys", "create", "--name", "alice", "--credits", "3", "--models", "tiny-sdxl", cwd=tmp_path)
    assert "requests/min: 30 (default)" in out and "images/min: 90 (default)" in out
    assert db.exists()
    fails(
        env,
        "keys",
        "create",
        "--name",
        "bob",
        "--credits",
        "3",
        "--models",
        "tiny-sdxl,dall-e-3",
        match="unknown model id(s) dall-e-3",
        cwd=tmp_path,
    )
    # --config, before or after the command
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = str(tmp_path / "serve_config.yaml")
    assert "alice" in ok(env, "--config", config, "keys", "list", cwd=elsewhere)
    assert "alice" in ok(env, "keys", "list", "--config", config, cwd=elsewhere)
    fails(env, "keys", "list", cwd=elsewhere, match="no config file")


def test_config_errors(tmp_path, monkeypatch, capsys):
    from serve_app import cli

    monkeypatch.delenv("IMAGEGEN_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["keys", "list"]) == 1
    assert "no config file at serve_config.yaml" in capsys.readouterr().err
    assert cli.main(["--config", "missing.yaml", "keys", "list"]) == 1
    assert "no config file at missing.yaml" in capsys.readouterr().err
    (tmp_path / "serve_config.yaml").write_text("applications:\n  - args:\n      models: []\n")
    assert cli.main(["keys", "list"]) == 1
    assert "invalid config serve_config.yaml: models" in capsys.readouterr().err
    (tmp_path / "serve_config.yaml").write_text(CONFIG.replace("{db}", "mysql://x/y").replace("sqlite:///", ""))
    assert cli.main(["keys", "list"]) == 1
    assert "unsupported accounts database URL" in capsys.readouterr().err


def test_created_key_authenticates_and_bills(env, tmp_path):
    """The CLI and the service share the database: a created key works at once."""
    import asyncio

    from serve_app.accounts import Accounts, open_store

    secret = ok(env, "keys", "create", "--name", "alice", "--credits", "2").strip().splitlines()[-1]
    accounts = Accounts(open_store(env["IMAGEGEN_DATABASE_URL"]))

    async def request():
        key = await accounts.authenticate(f"Bearer {secret}")
        reservation = await accounts.reserve(key, "req-1", "tiny-sdxl", 2, 500_000)
        return await accounts.settle(reservation, 1)

    try:
        settlement = asyncio.run(request())
    finally:
        accounts.close()
    assert settlement.credit_headers() == {"x-credits-charged": "0.5", "x-credits-remaining": "1.5"}
    out = ok(env, "usage", "alice")
    assert "balance 1.5 credits" in out and "tiny-sdxl" in out
    ok(env, "keys", "revoke", "alice")


def test_release_stale_refunds_only_what_no_request_can_still_deliver(run_main):
    import os

    from serve_app.accounts import open_store

    store = open_store(os.environ["IMAGEGEN_DATABASE_URL"])
    key_id = store.key_by_name("alice").id
    store.reserve(key_id, "running", "m", 1, 1)
    code, out, _ = run_main("reservations", "release-stale")  # the default: 2 x 300 s + 300 s
    assert code == 0 and "Released 0 stale reservation(s)" in out
    assert store.usage(key_id).reserved_units == 1
    store.close()


def test_an_operator_decides_who_may_disable_the_safety_checker(env):
    created = imagegen(env, "keys", "create", "--name", "trusted", "--credits", "1", "--allow-disable-safety-checker")
    assert created.returncode == 0 and "may disable the safety checker: yes" in created.stdout
    assert imagegen(env, "keys", "create", "--name", "other", "--credits", "1").returncode == 0

    def permissions():
        listed = json.loads(imagegen(env, "keys", "list", "--json").stdout)
        return {key["name"]: key["may_disable_safety_checker"] for key in listed}

    assert permissions() == {"other": False, "trusted": True}
    assert imagegen(env, "keys", "safety-checker", "trusted", "deny-disable").returncode == 0
    assert imagegen(env, "keys", "safety-checker", "other", "allow-disable").returncode == 0
    assert permissions() == {"other": True, "trusted": False}
    missing = imagegen(env, "keys", "safety-checker", "nobody", "allow-disable")
    assert missing.returncode == 1 and "no key named 'nobody'" in missing.stderr


def test_the_same_commands_on_postgresql_and_db_upgrade(env, postgres):
    """The CLI is not tied to SQLite: a PostgreSQL URL works the same, and ``db upgrade``
    reports the schema revision without showing the URL's password."""
    from serve_app.accounts.migrate import head_revision

    env = {**env, "IMAGEGEN_DATABASE_URL": postgres.create_database().replace("imagegen@", "imagegen:s3cret@")}
    first = ok(env, "db", "upgrade")
    assert f"from revision (empty) to {head_revision()}" in first and "s3cret" not in first
    assert f"at the newest schema revision, {head_revision()}" in ok(env, "db", "upgrade")
    secret = ok(env, "keys", "create", "--name", "alice", "--credits", "3").strip().splitlines()[-1]
    assert "balance 4.5" in ok(env, "credits", "add", "alice", "1.5")
    assert json.loads(ok(env, "keys", "list", "--json"))[0]["balance"] == "4.5"
    assert secret not in ok(env, "usage")


def test_db_upgrade_of_a_database_of_the_previous_release(env, tmp_path):
    import sqlite3

    from tests.test_accounts_store import LEGACY_DATA, LEGACY_SQLITE_V1

    path = tmp_path / "db" / "accounts.db"
    path.parent.mkdir()
    with sqlite3.connect(path) as conn:
        conn.executescript(LEGACY_SQLITE_V1 + LEGACY_DATA)
    assert "from revision 0001 to" in ok(env, "db", "upgrade")
    assert "old: balance 7 credits" in ok(env, "usage", "old")
