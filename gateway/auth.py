"""The admin API's bearer token: where it comes from, and how it is checked.

The admin API can start processes, so it is never open: a token is generated on first start (and
kept in the data dir, readable by the owner only) unless the operator configured one. Listening off
loopback with a token nobody chose on purpose would hand control of the host to whoever can read a
data dir, so that combination is refused outright.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from gateway.config import ConfigError, GatewayConfig, is_loopback, split_host_port


def _check_token(token: str, source: str) -> str:
    """A token must survive being put in a header verbatim: visible ASCII, no spaces."""
    if not token:
        raise ConfigError(f"{source}: the admin token is empty")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ConfigError(f"{source}: the admin token must be visible ASCII without spaces")
    return token


def _write_new_token(path: Path) -> str:
    """Create `path` with a fresh token, mode 0600, atomically and without clobbering.

    The token is written to a temporary file and hard-linked into place: if another process won
    the race, its token is kept and returned, so two gateways never disagree about it.
    """
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _check_token(path.read_text().strip(), str(path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return token


def load_admin_token(cfg: GatewayConfig, *, create: bool) -> str:
    """The admin token: inline config, else the token file (generated there if `create`).

    Raises ConfigError when the admin listener is off loopback without an explicitly configured
    token, when the file is missing and `create` is false, or when it cannot be read.
    """
    host, _ = split_host_port(cfg.admin_listen, "admin_listen")
    explicit = bool(cfg.admin_token or cfg.admin_token_file)
    if not is_loopback(host) and not explicit:
        raise ConfigError(
            f"admin_listen: refusing to listen off loopback ({host}) without an admin token; "
            "set admin_token or admin_token_file"
        )
    if cfg.admin_token:
        return _check_token(cfg.admin_token.strip(), "admin_token")
    path = cfg.token_path
    try:
        return _check_token(path.read_text().strip(), str(path))
    except FileNotFoundError:
        if not create:
            raise ConfigError(
                f"no admin token: {path} does not exist "
                "(start `dorm serve` first, or pass --token / set DORM_ADMIN_TOKEN)"
            ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the admin token file {path}: {exc.strerror}") from None
    try:
        return _write_new_token(path)
    except OSError as exc:
        raise ConfigError(f"cannot create the admin token file {path}: {exc.strerror}") from None


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def check_bearer(header_value: bytes | None, token: str) -> bool:
    """True if `header_value` is `Bearer <token>`.

    Both sides are hashed before the constant-time compare so that not even the token's length
    leaks through timing.
    """
    if not header_value or not token:
        return False
    scheme, _, credentials = header_value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(_digest(credentials.strip()), _digest(token.encode()))
