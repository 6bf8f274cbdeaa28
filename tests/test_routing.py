"""Host → (app, branch) routing: `gateway.routing.parse_host` as a unit, then end to end.

The echo app answers "/" with "hello from <app>/<branch>", which is what the end-to-end tests check:
the request reached the instance of exactly that branch.
"""

from __future__ import annotations

import http.client
import json

import pytest

from gateway.routing import Route, parse_host
from tests.conftest import Gateway


def suffixes(*domains: str) -> tuple[str, ...]:
    """Domain suffixes exactly as the data plane builds them: ".domain", longest first."""
    return tuple(sorted(("." + d for d in domains), key=len, reverse=True))


DOMAINS = suffixes("localhost", "example.test")


# -- parse_host (unit) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        # <app>.<domain> → the default branch
        ("echo.localhost", Route("echo", "main")),
        ("echo.example.test", Route("echo", "main")),
        # <branch>--<app>.<domain>
        ("feat--echo.localhost", Route("echo", "feat")),
        ("feat-1--echo.example.test", Route("echo", "feat-1")),
        # <branch>.<app>.<domain>
        ("feat.echo.localhost", Route("echo", "feat")),
        ("pr-42.my-app.example.test", Route("my-app", "pr-42")),
        # ports
        ("echo.localhost:8080", Route("echo", "main")),
        ("feat--echo.localhost:1", Route("echo", "feat")),
        ("feat.echo.example.test:65535", Route("echo", "feat")),
        # trailing dot (a fully qualified name), with and without a port
        ("echo.localhost.", Route("echo", "main")),
        ("feat.echo.localhost.:8080", Route("echo", "feat")),
        # case-insensitive, surrounding whitespace ignored
        ("ECHO.LocalHost", Route("echo", "main")),
        ("Feat--Echo.EXAMPLE.TEST:80", Route("echo", "feat")),
        ("  echo.localhost  ", Route("echo", "main")),
        # app names cannot contain "--": a branch may, and the split is at the LAST "--"
        ("a--b--echo.localhost", Route("echo", "a--b")),
        ("x--y--z--app1.localhost", Route("app1", "x--y--z")),
        ("a-b--c-d.localhost", Route("c-d", "a-b")),
        # digits are fine in both
        ("1--2.localhost", Route("2", "1")),
    ],
)
def test_parse_host_accepts(host: str, expected: Route) -> None:
    assert parse_host(host, DOMAINS) == expected


@pytest.mark.parametrize(
    "host",
    [
        "",
        ":8080",
        "localhost",  # the bare domain names no app
        "localhost:8080",
        ".localhost",
        "example.test",
        "echo.example.com",  # not one of our domains
        "echo.notlocalhost",  # a suffix match must be at a label boundary
        "echo-localhost",
        "127.0.0.1",
        "127.0.0.1:8080",
        "[::1]",  # IPv6 literals are never apps
        "[::1]:8080",
        "[fe80::1%25eth0]:80",
        "a.b.echo.localhost",  # too many labels
        "w.x.y.z.localhost",
        "echo.localhost:http",  # a port must be digits
        "echo.localhost:80:80",
        "echo.localhost:-1",
        "echo..localhost",  # empty label
        "..localhost",
        "-echo.localhost",  # labels start and end with a letter or digit
        "echo-.localhost",
        "ec_ho.localhost",
        "ec ho.localhost",
        "e*o.localhost",
        "écho.localhost",
        "a" * 64 + ".localhost",  # a label is at most 63 characters
        "--echo.localhost",  # empty branch
        "feat--.localhost",  # empty app
        "feat---echo.localhost",  # last "--" leaves branch "feat-", not a label
        "feat.-echo.localhost",
        "-feat.echo.localhost",
        "feat_1.echo.localhost",
        "user@echo.localhost",
    ],
)
def test_parse_host_rejects(host: str) -> None:
    assert parse_host(host, DOMAINS) is None


def test_parse_host_label_length_boundary() -> None:
    assert parse_host("a" * 63 + ".localhost", DOMAINS) == Route("a" * 63, "main")
    assert parse_host("b" * 63 + "--" + "a" * 63 + ".localhost", DOMAINS) == Route(
        "a" * 63, "b" * 63
    )


def test_parse_host_longest_suffix_wins() -> None:
    doms = suffixes("example.com", "b.example.com")
    assert doms == (".b.example.com", ".example.com")
    # Under the longer suffix "app" is the app; under the shorter it would be branch "app" of "b".
    assert parse_host("app.b.example.com", doms) == Route("app", "main")
    assert parse_host("feat.app.b.example.com", doms) == Route("app", "feat")
    assert parse_host("app.example.com", doms) == Route("app", "main")
    assert parse_host("app.c.example.com", doms) == Route("c", "app")
    # A host only the shorter suffix can take is still routed by it.
    assert parse_host("b.example.com", doms) == Route("b", "main")


def test_parse_host_suffix_order_is_what_the_caller_gives() -> None:
    """parse_host trusts the caller's order (the data plane sorts longest first)."""
    shortest_first = (".example.com", ".b.example.com")
    assert parse_host("app.b.example.com", shortest_first) == Route("b", "app")


# -- end to end ------------------------------------------------------------------------------------


def get(gw: Gateway, host: str, path: str = "/") -> tuple[int, bytes]:
    resp = gw.request(path, host=host)
    return resp.status, resp.body


@pytest.fixture
def branched(gateway: Gateway) -> Gateway:
    """The echo app with a second branch, "feat", whose environment differs."""
    status, body = gateway.admin(
        "PUT", "/v1/apps/echo/branches/feat", {"env": {"ECHO_BRANCH_MARK": "feat-env"}}
    )
    assert status in (200, 201), body
    return gateway


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("echo.localhost", b"hello from echo/main\n"),
        ("echo.example.test", b"hello from echo/main\n"),
        ("ECHO.localhost.", b"hello from echo/main\n"),
        ("main--echo.localhost", b"hello from echo/main\n"),
        ("main.echo.localhost", b"hello from echo/main\n"),
        ("feat--echo.localhost", b"hello from echo/feat\n"),
        ("feat.echo.localhost", b"hello from echo/feat\n"),
        ("feat--echo.example.test", b"hello from echo/feat\n"),
        ("feat.echo.example.test", b"hello from echo/feat\n"),
    ],
)
def test_each_host_form_reaches_its_branch(branched: Gateway, host: str, expected: bytes) -> None:
    assert get(branched, host) == (200, expected)
    # ... and with the port the client put in Host
    assert get(branched, f"{host}:{branched.port}") == (200, expected)


def test_branches_are_separate_instances_with_their_own_env(branched: Gateway) -> None:
    main_pid = get(branched, "echo.localhost", "/pid")
    feat_pid = get(branched, "feat--echo.localhost", "/pid")
    assert main_pid[0] == feat_pid[0] == 200
    assert main_pid[1] != feat_pid[1]
    assert get(branched, "feat.echo.localhost", "/pid") == feat_pid
    assert get(branched, "feat--echo.localhost", "/env?name=ECHO_BRANCH_MARK") == (200, b"feat-env")
    assert get(branched, "echo.localhost", "/env?name=ECHO_BRANCH_MARK") == (200, b"")
    assert get(branched, "echo.localhost", "/env?name=DORM_BRANCH") == (200, b"main")
    assert get(branched, "feat.echo.localhost", "/env?name=DORM_BRANCH") == (200, b"feat")


def test_unknown_host_is_404_naming_the_host(gateway: Gateway) -> None:
    for host in ("nope.localhost", "feat--nope.example.test", "example.org", "127.0.0.1"):
        resp = gateway.request("/", host=host)
        assert resp.status == 404, host
        assert host.encode() in resp.body, resp.body
        assert resp.headers["content-type"].startswith("text/plain")
        assert int(resp.headers["content-length"]) == len(resp.body)


def test_unknown_branch_is_404(gateway: Gateway) -> None:
    for host in ("nobranch--echo.localhost", "nobranch.echo.localhost"):
        resp = gateway.request("/", host=host)
        assert resp.status == 404, host
        assert host.encode() in resp.body
    # the app itself is unaffected
    assert get(gateway, "echo.localhost") == (200, b"hello from echo/main\n")


def test_invalid_host_names_are_404(gateway: Gateway) -> None:
    for host in ("a.b.echo.localhost", "-x.localhost", "[::1]:80", "echo.localhost:x"):
        assert gateway.request("/", host=host).status == 404, host


def test_404_keeps_the_connection_for_the_next_request(gateway: Gateway) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": "nope.localhost"})
        resp = conn.getresponse()
        assert resp.status == 404
        resp.read()
        conn.request("GET", "/", headers={"Host": "echo.localhost"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"hello from echo/main\n")
    finally:
        conn.close()


def test_absolute_form_target_routes_by_its_authority(branched: Gateway) -> None:
    raw = branched.raw(
        b"GET http://feat--echo.localhost/ HTTP/1.1\r\nHost: echo.localhost\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.endswith(b"\r\n\r\nhello from echo/feat\n")


def test_absolute_form_target_replaces_host_for_the_app(branched: Gateway) -> None:
    raw = branched.raw(
        b"GET http://feat--echo.localhost/headers HTTP/1.1\r\nHost: echo.localhost\r\n"
        b"Connection: close\r\n\r\n"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert json.loads(body)["host"] == ["feat--echo.localhost"]


def test_branch_created_after_a_404_is_routed(gateway: Gateway) -> None:
    assert gateway.request("/", host="late--echo.localhost").status == 404
    status, body = gateway.admin("PUT", "/v1/apps/echo/branches/late", {"env": {}})
    assert status == 201, body
    assert get(gateway, "late--echo.localhost") == (200, b"hello from echo/late\n")


def test_deleted_branch_is_404(branched: Gateway) -> None:
    assert get(branched, "feat--echo.localhost") == (200, b"hello from echo/feat\n")
    status, body = branched.admin("DELETE", "/v1/apps/echo/branches/feat")
    assert status == 200, body
    assert branched.request("/", host="feat--echo.localhost").status == 404
    assert branched.request("/", host="feat.echo.localhost").status == 404


def test_branch_env_change_applies_to_the_next_start(branched: Gateway) -> None:
    host = "feat--echo.localhost"
    assert get(branched, host, "/env?name=ECHO_BRANCH_MARK") == (200, b"feat-env")
    status, body = branched.admin(
        "PUT", "/v1/apps/echo/branches/feat", {"env": {"ECHO_BRANCH_MARK": "changed"}}
    )
    assert status == 200, body
    assert get(branched, host, "/env?name=ECHO_BRANCH_MARK") == (200, b"changed")


def test_app_created_after_a_404_is_routed(gateway: Gateway) -> None:
    from tests.conftest import echo_spec

    assert gateway.request("/", host="later.localhost").status == 404
    gateway.put_app("later", echo_spec())
    assert get(gateway, "later.localhost") == (200, b"hello from later/main\n")
    assert get(gateway, "later.example.test") == (200, b"hello from later/main\n")
