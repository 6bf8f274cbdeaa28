"""The runner's request validation and version matching, without a gateway (pure functions)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from gateway.config import ConfigError, load_config
from runtimes.runner.api import ApiError, parse_job, pick_language, version_matches
from runtimes.runner.languages import Language
from runtimes.runner.limits import Settings
from runtimes.runner.pools import (
    aggregate,
    layouts,
    load_overrides,
    pool_for,
    save_overrides,
    split,
)

PY = Language(name="python", version="3.11.7", aliases=("py", "python3"), run=("python3",))
PY12 = Language(name="python", version="3.12.1", aliases=("py",), run=("python3",))
C = Language(name="c", version="12.2.0", aliases=("gcc",), run=("./a.out",), runtime="gcc")
LANGS = [PY, PY12, C]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("3.11.7", True),
        ("3.11.6", False),
        ("*", True),
        ("x", True),
        ("3", True),
        ("4", False),
        ("3.x", True),
        ("3.11", True),
        ("3.11.x", True),
        ("3.12.x", False),
        (">=3.10", True),
        (">=3.12", False),
        (">3.11", False),
        (">3.11.6", True),
        ("<3.12", True),
        ("<=3.11", True),
        ("<3.11.7", False),
        ("^3", True),
        ("^3.11", True),
        ("^3.12", False),
        ("^2.7", False),
        ("~3.11", True),
        ("~3.11.8", False),
        (">=3.10 <3.12", True),
        (">= 3.10 < 3.11", False),
        ("3.10 - 3.11", True),
        ("3.0 - 3.11.6", False),
        ("2.x || 3.11.x", True),
        ("2.x || 3.12.x", False),
        ("v3.11.7", True),
        ("banana", False),
    ],
)
def test_version_selectors(selector: str, expected: bool) -> None:
    assert version_matches("3.11.7", selector) is expected


def test_caret_on_zero_major() -> None:
    assert version_matches("0.2.5", "^0.2.3")
    assert not version_matches("0.3.0", "^0.2.3")
    assert not version_matches("0.0.4", "^0.0.3")


def test_pick_language_prefers_the_newest_match_and_aliases() -> None:
    assert pick_language(LANGS, "python", "*") is PY12
    assert pick_language(LANGS, "py", "3.11.x") is PY
    assert pick_language(LANGS, "python3", "*") is PY  # only 3.11.7 has that alias
    assert pick_language(LANGS, "gcc", "12") is C
    assert pick_language(LANGS, "ruby", "*") is None
    assert pick_language(LANGS, "python", "4") is None


def job(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"language": "python", "version": "*", "files": [{"content": "x"}]}
    body.update(fields)
    return body


def error(body: Any, settings: Settings | None = None) -> str:
    with pytest.raises(ApiError) as exc:
        parse_job(body, LANGS, settings or Settings())
    assert exc.value.status == 400
    return exc.value.message


def test_piston_messages_for_missing_fields() -> None:
    assert error({"version": "*", "files": []}) == "language is required as a string"
    assert error({"language": "python", "files": []}) == "version is required as a string"
    assert error({"language": "python", "version": "*"}) == "files is required as an array"
    assert error(job(files=[{"name": "a"}])) == "files[0].content is required as a string"
    assert error(job(language="cobol")) == "cobol-* runtime is unknown"
    assert error(job(version="2")) == "python-2 runtime is unknown"
    assert error([1, 2]) == "the request body must be a JSON object"


def test_limits_may_only_go_down() -> None:
    s = Settings()
    assert error(job(run_timeout=3001)) == "run_timeout cannot exceed the configured limit of 3000"
    assert error(job(run_timeout="1")) == "If specified, run_timeout must be a number"
    assert error(job(run_timeout=True)) == "If specified, run_timeout must be a number"
    assert error(job(compile_memory_limit=-5)) == "compile_memory_limit must be non-negative"
    assert "at least" in error(job(run_memory_limit=1000))
    parsed = parse_job(
        job(run_timeout=500, run_cpu_time=0, run_memory_limit=-1, compile_timeout=None), LANGS, s
    )
    assert parsed.run_limits.wall_ms == 500
    assert parsed.run_limits.cpu_ms == s.run_cpu_time  # 0 means "the default", as in Piston
    assert parsed.run_limits.memory == s.run_memory  # -1 means "the server's maximum"
    assert parsed.compile_limits.wall_ms == s.compile_timeout


@pytest.mark.parametrize(
    "name", ["../x", "/etc/x", "a/../../x", "a//b", "./a", "a\0b", "x" * 300, "a/" * 600 + "b"]
)
def test_traversal_and_bad_names_are_refused(name: str) -> None:
    assert error(job(files=[{"name": name, "content": "x"}])).startswith("files[0].name")


def test_files_decoding_and_defaults() -> None:
    body = job(
        files=[
            {"content": "print(1)"},
            {
                "name": "data/blob.bin",
                "content": base64.b64encode(b"\0\xff").decode(),
                "encoding": "base64",
            },
            {"name": "h.txt", "content": "00ff", "encoding": "hex"},
        ],
        stdin="abc",
        args=["1", "2"],
    )
    parsed = parse_job(body, LANGS, Settings())
    assert [f.name for f in parsed.files] == ["file0.code", "data/blob.bin", "h.txt"]
    assert [f.data for f in parsed.files] == [b"print(1)", b"\0\xff", b"\0\xff"]
    assert [f.utf8 for f in parsed.files] == [True, False, False]
    assert parsed.stdin == b"abc\n"  # Piston appends the missing newline
    assert parsed.args == ("1", "2")


def test_bad_encodings_and_contents() -> None:
    bad_b64 = job(files=[{"content": "!!!", "encoding": "base64"}, {"content": "x"}])
    assert error(bad_b64) == "files[0].content is not valid base64"
    assert error(job(files=[{"content": "zz", "encoding": "hex"}])) == (
        "files[0].content is not valid hex"
    )
    assert error(job(files=[{"content": "x", "encoding": "rot13"}])).startswith(
        "files[0].encoding must be one of"
    )
    only_binary = job(files=[{"content": "AA==", "encoding": "base64"}])
    assert error(only_binary) == "files must include at least one utf8 encoded file"
    twice = job(files=[{"name": "a", "content": "x"}, {"name": "a", "content": "y"}])
    assert "given twice" in error(twice)
    assert error(job(args=["a", 1])).startswith("args must be an array")
    assert error(job(stdin=5)) == "stdin must be a string"
    big = Settings(max_file_size=10)
    assert "larger than the maximum file size" in error(job(files=[{"content": "x" * 11}]), big)


# -- warm pools (runtimes/runner/pools.py) ------------------------------------------------------


def test_languages_without_binds_share_one_pool_and_binds_get_their_own() -> None:
    ruby = Language(name="ruby", version="3.2.0", aliases=("rb",), run=("ruby",), binds=("/opt",))
    defs = layouts([PY, C, ruby], 6, 12)
    assert [(d.name, d.languages, d.binds) for d in defs] == [
        ("default", ("python", "c"), ()),
        ("ruby", ("ruby",), ("/opt",)),
    ]
    assert pool_for(defs, [PY, C, ruby], "gcc") is defs[0]  # by alias
    assert pool_for(defs, [PY, C, ruby], "RB") is defs[1]
    assert pool_for(defs, [PY, C, ruby], "default") is defs[0]  # by pool name
    assert pool_for(defs, [PY, C, ruby], "cobol") is None


def test_pool_bounds_are_split_evenly_over_the_spawners() -> None:
    assert [split(5, 2, i) for i in range(2)] == [3, 2]
    assert [split(6, 3, i) for i in range(3)] == [2, 2, 2]
    assert [split(1, 3, i) for i in range(3)] == [1, 0, 0]
    defs = layouts([PY], 5, 7)
    assert sum(defs[0].share(3, i)[0] for i in range(3)) == 5
    assert sum(defs[0].share(3, i)[1] for i in range(3)) == 7


def test_pool_overrides_survive_a_round_trip_and_bad_files_are_ignored(tmp_path: Any) -> None:
    path = str(tmp_path / "run" / "runner-pools.json")
    assert load_overrides(path) == {}
    save_overrides(path, {"default": (2, 5)})
    assert load_overrides(path) == {"default": (2, 5)}
    (tmp_path / "run" / "runner-pools.json").write_text(
        '{"default": {"min_idle": 9, "max_idle": 1}'
    )
    assert load_overrides(path) == {}  # not JSON
    (tmp_path / "run" / "runner-pools.json").write_text(
        '{"default": {"min_idle": 9, "max_idle": 1}}'
    )
    assert load_overrides(path) == {}  # min > max


def test_pool_state_is_summed_over_the_spawners_that_answered() -> None:
    defs = layouts([PY], 2, 4)
    answer = {
        "refill_pending": False,
        "pools": [
            {
                "name": "default",
                "idle": 1,
                "target": 1,
                "peak": 2,
                "claimed": 3,
                "misses": 1,
                "built": 4,
                "forking": 0,
                "refill_rate": 0.05,
                "min_idle": 1,
                "max_idle": 2,
            },
        ],
    }
    [entry] = aggregate(defs, [answer, answer, None], {"memory": 1})
    assert entry["idle"] == 2 and entry["claimed"] == 6 and entry["misses"] == 2
    assert entry["built"] == 8 and entry["refill_rate"] == 0.1 and entry["peak_target"] == 4
    assert entry["answered"] == 2 and entry["spawners"][2] == {"spawner": 2, "answered": False}
    assert entry["min_idle"] == 2 and entry["max_idle"] == 4 and entry["kind"] == "runner"


# -- [runner] pool keys (gateway/config.py) -----------------------------------------------------


def test_runner_pool_keys_from_the_file_and_the_environment(tmp_path: Any) -> None:
    path = tmp_path / "dorm.toml"
    path.write_text('[runner]\nmin_idle = 3\nmax_idle = 9\nshrink_after = "5s"\n')
    runner = load_config(str(path), environ={"DORM_RUNNER_REFILL_CONCURRENCY": "2"}).runner
    assert (runner.min_idle, runner.max_idle, runner.refill_concurrency) == (3, 9, 2)
    assert runner.shrink_after == 5.0
    settings = Settings.from_json(runner.settings("dorm", "token"))
    assert (settings.min_idle, settings.max_idle, settings.refill_concurrency) == (3, 9, 2)
    defaults = load_config(None, environ={"DORM_RUNNER_MAX_IDLE": "20"}).runner
    assert (defaults.min_idle, defaults.max_idle, defaults.refill_concurrency) == (6, 20, 1)


@pytest.mark.parametrize(
    ("text", "environ", "needle"),
    [
        ("[runner]\nprewarm = 2\n", {}, "runner.prewarm is now min_idle"),
        (
            "[runner]\nmin_idle = 5\nmax_idle = 2\n",
            {},
            "runner.max_idle must be >= runner.min_idle",
        ),
        ("[runner]\nmax_idle = 1001\n", {}, "runner.max_idle"),
        ("[runner]\nrefill_concurrency = 0\n", {}, "runner.refill_concurrency"),
        ("[runner]\nmin_idel = 1\n", {}, "unknown key runner.min_idel"),
        ("", {"DORM_RUNNER_MIN_IDLE": "many"}, "DORM_RUNNER_MIN_IDLE"),
        ("", {"DORM_RUNNER_PREWARM": "2"}, "DORM_RUNNER_PREWARM is now DORM_RUNNER_MIN_IDLE"),
    ],
)
def test_bad_runner_pool_keys_name_the_key(
    tmp_path: Any, text: str, environ: dict[str, str], needle: str
) -> None:
    path = tmp_path / "dorm.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(str(path), environ=environ)
