"""Startup failures of `p2pfl-sim`: every bad input is one line on stderr and exit 2.

Each test feeds the CLI one hostile or careless input (issue 12, defect 3) and checks that
the process would print one line naming what is wrong and exit 2: no traceback, no work done.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sim.cli import main
from sim.scenario import MAX_NESTING, MAX_SCENARIO_BYTES, parse_scenario, to_toml


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *named: str) -> str:
    """Run the CLI; assert exit 2 and one stderr line that names every string in ``named``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("p2pfl-sim: error: ") and "Traceback" not in err
    for name in named:
        assert name in err, err
    return err


@pytest.fixture
def tiny(tmp_path: Path, small_document: Callable[..., dict[str, Any]]) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(parse_scenario(small_document(rounds=1))))
    return path


def test_toml_nested_thousands_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    refused(capsys, ["run", str(deep)], "deep.toml", f"nested at most {MAX_NESTING} deep")
    refused(capsys, ["sweep", str(deep), "--grid", "seed=1"], "nested")


def test_toml_nested_just_past_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Deep enough to refuse, shallow enough that the TOML parser itself copes.
    nested = tmp_path / "nested.toml"
    nested.write_text("a = " + "[" * MAX_NESTING + "]" * MAX_NESTING + "\n")
    refused(capsys, ["run", str(nested)], "nested")


def test_set_value_nested_thousands_deep(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(capsys, ["run", str(tiny), "--set", "a=" + "[" * 3000 + "]" * 3000], "--set a")
    assert len(err) < 200  # the value is elided, not printed


def test_set_key_path_thousands_of_parts(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["run", str(tiny), "--set", ".".join(["a"] * 3000) + "=1"], "--set")


def test_scenario_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "café"\n'.encode("latin-1"))
    refused(capsys, ["run", str(bad)], "latin1.toml", "UTF-8")


def test_scenario_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    refused(capsys, ["run", str(folder)], "folder.toml", "directory")
    refused(capsys, ["run", str(tmp_path)], "directory")


def test_scenario_is_a_device(capsys: pytest.CaptureFixture[str]) -> None:
    # /dev/zero never ends: reading it would hang, not fail.
    refused(capsys, ["run", os.devnull], "regular")
    if Path("/dev/zero").exists():
        refused(capsys, ["run", "/dev/zero"], "/dev/zero", "regular")


def test_scenario_file_too_large(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big.toml"
    with big.open("wb") as handle:
        handle.truncate(MAX_SCENARIO_BYTES + 1)
    refused(capsys, ["run", str(big)], "big.toml", "at most")


def test_scenario_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["run", str(tmp_path / "nope.toml")], "nope.toml", "No such file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_scenario_unreadable(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny.chmod(0)
    try:
        refused(capsys, ["run", str(tiny)], "tiny.toml", "readable")
    finally:
        tiny.chmod(0o600)


def test_run_out_names_an_existing_file(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "existing"
    existing.write_text("keep me\n")
    refused(capsys, ["run", str(tiny), "--out", str(existing), "--quiet"], "--out", "existing")
    assert existing.read_text() == "keep me\n"
    below = existing / "run"
    refused(capsys, ["run", str(tiny), "--out", str(below), "--quiet"], "--out", "Not a directory")


def test_sweep_and_compare_out_name_an_existing_file(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "existing"
    existing.write_text("keep me\n")
    sweep = ["sweep", str(tiny), "--grid", "learner.lr=0.1", "--out", str(existing), "--quiet"]
    refused(capsys, sweep, "--out")
    run_dir = tmp_path / "run"
    assert main(["run", str(tiny), "--out", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()
    refused(capsys, ["compare", str(run_dir), "--out", str(existing)], "--out")


def test_name_that_is_no_file_name(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["run", str(tiny), "--set", 'name="a\\u0000b"'], "name")
    refused(capsys, ["run", str(tiny), "--set", "name=../../elsewhere"], "name")


def test_bad_set_syntax(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["run", str(tiny), "--set", "rounds"], "--set")
    refused(capsys, ["run", str(tiny), "--set", "=3"], "--set")
    refused(capsys, ["run", str(tiny), "--set", "disruptions[4].count=1"], "past the array")
    refused(capsys, ["run", str(tiny), "--set", "rounds.x=1"], "rounds is not a table")


def test_bad_grid_and_sweep_options(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["sweep", str(tiny), "--grid", "learner.lr"], "--grid")
    refused(capsys, ["sweep", str(tiny), "--grid", "learner.lr="], "--grid")
    refused(capsys, ["sweep", str(tiny), "--grid", "a=1", "--grid", "a=2"], "each key once")
    refused(capsys, ["sweep", str(tiny), "--seeds", "0"], "--seeds")
    refused(capsys, ["sweep", str(tiny), "--jobs", "0"], "--jobs")
    refused(capsys, ["sweep", str(tiny), "--metric", "nope"], "--metric")
    refused(capsys, ["sweep", str(tiny), "--resume"], "--resume", "--out")
    refused(capsys, ["sweep", str(tiny), "--grid", "seed=1,2"], "--grid", "--seeds")
    refused(capsys, ["sweep", str(tiny), "--jobs", "100000"], "--jobs")
    many = ",".join(str(index / 1000) for index in range(1, 1000))
    refused(
        capsys, ["sweep", str(tiny), "--grid", f"learner.lr={many}", "--seeds", "1000"], "at most"
    )


def test_plot_and_compare_on_missing_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused(capsys, ["plot", str(tmp_path / "missing")], "missing", "metrics.csv")
    refused(capsys, ["compare", str(tmp_path / "missing")], "missing", "metrics.csv")
    refused(capsys, ["sweep", str(tmp_path / "missing.toml")], "missing.toml")


def test_live_shards_below_one(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["run", str(tiny), "--live", "--shards", "0"], "--shards")


def test_plot_and_compare_on_directories_not_written_by_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "metrics.csv").write_bytes(b"\xff\xfe\x00\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.csv").write_text("a,b\n1,2\n")
    for directory in (binary, other):
        refused(capsys, ["plot", str(directory)], directory.name, "metrics.csv")
        refused(capsys, ["compare", str(directory)], directory.name, "metrics.csv")
