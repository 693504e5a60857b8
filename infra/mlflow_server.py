"""Start `mlflow server --app-name basic-auth` with its auth config generated from the environment.

The entrypoint of `infra/mlflow.Dockerfile` and what `infra/local/stack.sh` runs. It writes
`basic_auth.ini` (mode 600) holding the admin credentials and the auth database, creates that
database when missing, puts the backend store URI in MLFLOW_BACKEND_STORE_URI (the variable
`--backend-store-uri` reads, so the database password stays out of `ps`), then execs
`python -m mlflow server ARGS...` with the arguments it was given.

Environment:
  MLFLOW_ADMIN_PASSWORD    required; at least 12 characters, never MLflow's old default
  MLFLOW_ADMIN_USERNAME    default `admin`
  POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_HOST, POSTGRES_DB  required
  POSTGRES_PORT            default 5432
  MLFLOW_AUTH_DB           default `mlflow_auth` (a database of its own beside POSTGRES_DB)
  MLFLOW_AUTH_DEFAULT_PERMISSION  default `READ`
  MLFLOW_AUTH_CONFIG_PATH  where to write the ini; default $TMPDIR/mlflow-auth/basic_auth.ini
  MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key shared by the workers; random per start when unset
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path

# MLflow shipped this as the admin password before 3.x; it is public, so never accept it.
LEGACY_DEFAULT_PASSWORD = "password1234"
MIN_PASSWORD_LENGTH = 12  # mlflow.utils.validation._validate_password's rule


class ConfigError(Exception):
    """The environment does not describe a safe, complete server."""


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise ConfigError(f"{name} is not set (see infra/.env.example)")
    return value


def check_admin_password(password: str) -> None:
    if password == LEGACY_DEFAULT_PASSWORD:
        raise ConfigError(
            "MLFLOW_ADMIN_PASSWORD is MLflow's publicly known old default; choose another"
        )
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(
            f"MLFLOW_ADMIN_PASSWORD must be at least {MIN_PASSWORD_LENGTH} characters"
        )


def postgres_uri(env: Mapping[str, str], database: str) -> str:
    """A SQLAlchemy URI for `database`, user and password percent-encoded."""
    user = urllib.parse.quote(_required(env, "POSTGRES_USER"), safe="")
    password = urllib.parse.quote(_required(env, "POSTGRES_PASSWORD"), safe="")
    host = _required(env, "POSTGRES_HOST")
    port = env.get("POSTGRES_PORT") or "5432"
    return f"postgresql://{user}:{password}@{host}:{port}/{urllib.parse.quote(database)}"


def _ini_value(value: str) -> str:
    # configparser interpolates `%`, and a percent-encoded password is full of them.
    if "\n" in value or "\r" in value:
        raise ConfigError("auth settings must be single-line values")
    return value.replace("%", "%%")


def auth_ini(env: Mapping[str, str]) -> str:
    """The text of basic_auth.ini for this environment (validated)."""
    password = _required(env, "MLFLOW_ADMIN_PASSWORD")
    check_admin_password(password)
    username = env.get("MLFLOW_ADMIN_USERNAME") or "admin"
    auth_db = env.get("MLFLOW_AUTH_DB") or "mlflow_auth"
    lines = [
        "[mlflow]",
        f"default_permission = {_ini_value(env.get('MLFLOW_AUTH_DEFAULT_PERMISSION') or 'READ')}",
        f"database_uri = {_ini_value(postgres_uri(env, auth_db))}",
        f"admin_username = {_ini_value(username)}",
        f"admin_password = {_ini_value(password)}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
    ]
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by the owner only, from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed


def server_environment(env: Mapping[str, str], ini_path: Path) -> dict[str, str]:
    """The environment `mlflow server` runs with (backend URI, auth config, CSRF key)."""
    out = dict(env)
    # The admin password lives in the 600 ini only; the env var would override it anyway.
    out.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)
    out.pop("MLFLOW_ADMIN_PASSWORD", None)
    out["MLFLOW_BACKEND_STORE_URI"] = postgres_uri(env, _required(env, "POSTGRES_DB"))
    out["MLFLOW_AUTH_CONFIG_PATH"] = str(ini_path)
    if not out.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        out["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    return out


def check_server_args(args: Sequence[str]) -> None:
    joined = " ".join(args)
    if "--app-name basic-auth" not in joined and "--app-name=basic-auth" not in joined:
        raise ConfigError("refusing to start without `--app-name basic-auth`")
    if "--backend-store-uri" in joined:
        raise ConfigError("the backend store comes from POSTGRES_*; drop --backend-store-uri")


def ensure_database(env: Mapping[str, str], database: str) -> None:
    """Create `database` on the PostgreSQL server when it does not exist yet."""
    import psycopg  # imported here: only the server process needs the driver
    from psycopg import sql

    uri = postgres_uri(env, _required(env, "POSTGRES_DB"))
    # autocommit: CREATE DATABASE cannot run inside a transaction.
    with psycopg.connect(uri, connect_timeout=10, autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if row is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def default_ini_path() -> Path:
    return Path(tempfile.gettempdir()) / "mlflow-auth" / "basic_auth.ini"


def main(argv: Sequence[str]) -> int:
    env = dict(os.environ)
    try:
        check_server_args(argv)
        ini_text = auth_ini(env)
        ini_path = Path(env.get("MLFLOW_AUTH_CONFIG_PATH") or default_ini_path())
        server_env = server_environment(env, ini_path)
    except ConfigError as exc:
        print(f"mlflow_server: {exc}", file=sys.stderr)
        return 2
    write_private(ini_path, ini_text)
    ensure_database(env, env.get("MLFLOW_AUTH_DB") or "mlflow_auth")
    command = [sys.executable, "-m", "mlflow", "server", *argv]
    # exec keeps the pid, so pid files and the container's PID 1 are the server itself.
    os.execve(sys.executable, command, server_env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
