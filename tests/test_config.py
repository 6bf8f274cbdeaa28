"""dorm.toml parsing, DORM_* overrides, unit parsing, and the admin token rules."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway import admin
from gateway.auth import check_bearer, load_admin_token
from gateway.config import (
    ConfigError,
    GatewayConfig,
    is_loopback,
    load_config,
    split_host_port,
)
from gateway.names import InvalidName, check_app_name, check_branch_name
from gateway.units import UnitError, format_size, parse_duration, parse_size


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "dorm.toml"
    path.write_text(text)
    return str(path)


def test_volume_owner_is_the_sandboxes_storage_owner() -> None:
    from gateway import config
    from sandboxes import idmap

    assert config.VOLUME_OWNER_UID == idmap.STORAGE_UID


def test_defaults_without_a_file() -> None:
    cfg = load_config(None, environ={})
    assert cfg.gateway == GatewayConfig()
    assert cfg.source == "(defaults)"


def test_toml_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[gateway]
listen = "127.0.0.1:9000"
admin_listen = "[::1]:9001"
domains = ["Example.COM.", "localhost"]
data_dir = "/tmp/dorm-x"
header_timeout = "2s"
keepalive_timeout = 90
max_header_size = "32KiB"
log_max_bytes = "1MiB"
log_keep = 5
trust_forwarded = true

[apps.demo]
command = ["python3", "app.py"]
idle_timeout = "1m"
""",
    )
    cfg = load_config(path, environ={})
    g = cfg.gateway
    assert (g.listen, g.admin_listen) == ("127.0.0.1:9000", "[::1]:9001")
    assert g.domains == ("example.com", "localhost")
    assert (g.header_timeout, g.keepalive_timeout) == (2.0, 90.0)
    assert (g.max_header_size, g.log_max_bytes, g.log_keep) == (32 * 1024, 1024**2, 5)
    assert g.trust_forwarded is True
    assert g.run_path == Path("/tmp/dorm-x/run")
    assert g.token_path == Path("/tmp/dorm-x/admin.token")
    assert [a.name for a in cfg.apps] == ["demo"]
    assert cfg.apps[0].idle_timeout == 60.0
    assert cfg.source == path


def test_admin_limits(tmp_path: Path) -> None:
    """The admin API's connection cap and minimum upload rate: defaults, TOML, DORM_*."""
    g = load_config(write(tmp_path, "[gateway]\n"), environ={}).gateway
    assert (g.admin_max_connections, g.admin_min_upload_rate, g.admin_upload_grace) == (
        256,
        16 * 1024,
        10.0,
    )
    assert g.admin_max_connections == admin.MAX_CONNECTIONS
    text = (
        '[gateway]\nadmin_max_connections = 32\nadmin_min_upload_rate = "64KiB"\n'
        'admin_upload_grace = "1m"\n'
    )
    g = load_config(write(tmp_path, text), environ={}).gateway
    assert (g.admin_max_connections, g.admin_min_upload_rate, g.admin_upload_grace) == (
        32,
        64 * 1024,
        60.0,
    )
    env = {
        "DORM_ADMIN_MAX_CONNECTIONS": "8",
        "DORM_ADMIN_MIN_UPLOAD_RATE": "0",
        "DORM_ADMIN_UPLOAD_GRACE": "0",  # no minimum, so no grace is needed
    }
    g = load_config(write(tmp_path, text), environ=env).gateway
    assert (g.admin_max_connections, g.admin_min_upload_rate, g.admin_upload_grace) == (8, 0, 0)
    with pytest.raises(ConfigError, match="DORM_ADMIN_MIN_UPLOAD_RATE"):
        load_config(write(tmp_path, text), environ={"DORM_ADMIN_MIN_UPLOAD_RATE": "-1"})


def test_environment_overrides_every_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nlisten = "127.0.0.1:9000"\nlog_keep = 1\n')
    env = {
        "DORM_LISTEN": "127.0.0.1:7000",
        "DORM_DOMAINS": "a.test, b.test",
        "DORM_LOG_KEEP": "4",
        "DORM_TRUST_FORWARDED": "yes",
        "DORM_BODY_TIMEOUT": "1m",
        "DORM_MAX_HEADER_SIZE": "8KiB",
    }
    g = load_config(path, environ=env).gateway
    assert g.listen == "127.0.0.1:7000"
    assert g.domains == ("a.test", "b.test")
    assert (g.log_keep, g.trust_forwarded, g.body_timeout) == (4, True, 60.0)
    assert g.max_header_size == 8192
    # DORM_CONFIG picks the file.
    assert load_config(None, environ={"DORM_CONFIG": path}).gateway.listen == "127.0.0.1:9000"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[gateway]\nlisten_port = 1\n", "unknown key gateway.listen_port"),
        ("[gatway]\n", "unknown section [gatway]"),
        ("[gateway]\nlisten = 8080\n", "listen: expected a string"),
        ('[gateway]\nlisten = "nowhere"\n', "listen: expected host:port"),
        ('[gateway]\nadmin_listen = "1.2.3.4:99999"\n', "admin_listen"),
        ('[gateway]\nheader_timeout = "soon"\n', "header_timeout"),
        ('[gateway]\nmax_header_size = "big"\n', "max_header_size"),
        ("[gateway]\nmax_header_size = 10\n", "max_header_size: must be at least 1KiB"),
        ("[gateway]\nlog_max_bytes = 10\n", "log_max_bytes: must be at least 4KiB"),
        ("[gateway]\nlog_keep = -1\n", "log_keep: expected a whole number"),
        ('[gateway]\ntrust_forwarded = "yes"\n', "trust_forwarded: expected true or false"),
        ('[gateway]\nisolation = "vm"\n', "isolation: expected one of"),
        ("[gateway]\ndomains = []\n", "domains"),
        ('[gateway]\ndomains = "x.com"\n', "domains: expected a list"),
        ("[gateway]\nmax_warm_instances = 0\n", "max_warm_instances"),
        ("[gateway]\nadmin_max_connections = 0\n", "admin_max_connections: expected 1 to"),
        ('[gateway]\nadmin_min_upload_rate = "fast"\n', "admin_min_upload_rate"),
        ('[gateway]\nadmin_upload_grace = "later"\n', "admin_upload_grace"),
        ("[gateway]\nadmin_upload_grace = 0\n", "admin_upload_grace: must be more than 0s"),
        ('[gateway]\nuid_range = "99-200"\n', "uid_range: must lie within"),
        ('[gateway]\nuid_range = "2147480000-2147489999"\n', "must not contain 2147483646"),
        ('[runner]\nuid_range = "2147483646-2147483646"\n', "must not contain 2147483646"),
        ("[gateway\n", "not valid TOML"),
        ('gateway = "x"\n', "[gateway] must be a table"),
        ('[apps.demo]\ncommand = "x"\n', "apps.demo.command"),
        ("[apps.Bad]\ncommand = ['x']\n", "apps.Bad.name"),
    ],
)
def test_bad_toml_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("DORM_LOG_KEEP", "-3", "DORM_LOG_KEEP: log_keep"),
        ("DORM_TRUST_FORWARDED", "maybe", "DORM_TRUST_FORWARDED"),
        ("DORM_HEADER_TIMEOUT", "fast", "DORM_HEADER_TIMEOUT"),
        ("DORM_LISTEN", "x", "listen"),
    ],
)
def test_bad_environment_names_the_variable(var: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, environ={var: value})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/dorm.toml", environ={})


def test_host_port_and_loopback() -> None:
    assert split_host_port("127.0.0.1:80", "k") == ("127.0.0.1", 80)
    assert split_host_port("[::1]:8080", "k") == ("::1", 8080)
    assert split_host_port(":8080", "k") == ("0.0.0.0", 8080)
    for bad in ("8080", "host:", "host:x", "host:70000"):
        with pytest.raises(ConfigError, match="k:"):
            split_host_port(bad, "k")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    assert not is_loopback("example.com")


# -- units -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("300", 300.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
        (" 10S ", 10.0),
        (0, 0.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "soon", "5 m", "m5", "5m3", "-1", -1, True, None, "inf"])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(UnitError):
        parse_duration(value)
    with pytest.raises(UnitError):
        parse_duration(float("nan"))


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (512, 512),
        (1024.0, 1024),
        ("512", 512),
        ("64KiB", 65536),
        ("10MiB", 10 * 1024**2),
        ("1G", 10**9),
        ("1 gib", 1024**3),
        ("2kb", 2000),
        ("1.5KiB", 1536),
        ("7b", 7),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["lots", "10 XB", "-5", -5, 1.5, True, None, [], "1e3"])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(UnitError):
        parse_size(value)


def test_format_size_round_trips() -> None:
    assert [format_size(n) for n in (0, 1000, 1024, 1536, 256 * 1024**2, 3 * 1024**3)] == [
        "0",
        "1000",
        "1KiB",
        "1536",
        "256MiB",
        "3GiB",
    ]
    for n in (1, 1024, 1536, 10 * 1024**2, 5 * 1024**3 + 1):
        assert parse_size(format_size(n)) == n


# -- names -----------------------------------------------------------------------------------------
def test_names() -> None:
    for good in ("a", "demo", "my-app-2", "0", "a" * 63):
        assert check_app_name(good) == good
        assert check_branch_name(good) == good
    for bad in ("", "-a", "a-", "A", "a_b", "a.b", "a" * 64, "é", 5):
        with pytest.raises(InvalidName):
            check_branch_name(bad)
    assert check_branch_name("feat--x") == "feat--x"
    with pytest.raises(InvalidName, match="--"):
        check_app_name("feat--x")


# -- admin token -----------------------------------------------------------------------------------
def test_token_inline_wins(tmp_path: Path) -> None:
    cfg = GatewayConfig(data_dir=str(tmp_path), admin_token=" s3cret ")
    assert load_admin_token(cfg, create=True) == "s3cret"
    assert not (tmp_path / "admin.token").exists()


def test_token_generated_once_with_0600(tmp_path: Path) -> None:
    cfg = GatewayConfig(data_dir=str(tmp_path / "data"))
    with pytest.raises(ConfigError, match="no admin token"):
        load_admin_token(cfg, create=False)
    token = load_admin_token(cfg, create=True)
    assert len(token) >= 40
    path = tmp_path / "data" / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_admin_token(cfg, create=True) == token
    assert load_admin_token(cfg, create=False) == token
    assert [p.name for p in path.parent.iterdir()] == ["admin.token"]  # no temp file left


def test_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "tok"
    token_file.write_text("from-file\n")
    cfg = GatewayConfig(data_dir=str(tmp_path), admin_token_file=str(token_file))
    assert load_admin_token(cfg, create=False) == "from-file"
    token_file.write_text("has space\n")
    with pytest.raises(ConfigError, match="visible ASCII"):
        load_admin_token(cfg, create=False)
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_admin_token(cfg, create=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "tok"
    token_file.write_text("x")
    token_file.chmod(0)
    cfg = GatewayConfig(data_dir=str(tmp_path), admin_token_file=str(token_file))
    with pytest.raises(ConfigError, match="cannot read"):
        load_admin_token(cfg, create=False)


def test_off_loopback_needs_an_explicit_token(tmp_path: Path) -> None:
    cfg = GatewayConfig(data_dir=str(tmp_path), admin_listen="0.0.0.0:8081")
    with pytest.raises(ConfigError, match="refusing to listen off loopback"):
        load_admin_token(cfg, create=True)
    assert not (tmp_path / "admin.token").exists()
    explicit = GatewayConfig(
        data_dir=str(tmp_path), admin_listen="0.0.0.0:8081", admin_token="chosen-token"
    )
    assert load_admin_token(explicit, create=True) == "chosen-token"
    token_file = tmp_path / "chosen"
    token_file.write_text("from-file")
    from_file = GatewayConfig(
        data_dir=str(tmp_path), admin_listen="10.1.2.3:8081", admin_token_file=str(token_file)
    )
    assert load_admin_token(from_file, create=False) == "from-file"


def test_check_bearer() -> None:
    assert check_bearer(b"Bearer abc", "abc")
    assert check_bearer(b"bearer   abc ", "abc")
    assert not check_bearer(b"Bearer abcd", "abc")
    assert not check_bearer(b"abc", "abc")
    assert not check_bearer(b"Bearer abc", "")
    assert not check_bearer(b"", "abc")
