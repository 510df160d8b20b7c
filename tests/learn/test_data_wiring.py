"""A user's data through the simulator CLI, scenario files and the node config."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pfl.config import config_from_dict
from p2pfl.errors import ConfigError
from sim.cli import main as sim_main
from sim.scenario import parse_scenario


def user_npz(path: Path, *, clients: int = 0) -> Path:
    """A linearly separable 3-class task as a user would save it with numpy."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 3))).argmax(1)
    arrays = {"x_train": x[:320], "y_train": y[:320], "x_test": x[320:], "y_test": y[320:]}
    if clients:
        arrays["client"] = np.arange(320) % clients
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def run_args(out: Path, *extra: str) -> list[str]:
    sets = ["topology.n=6", "topology.m=2", "rounds=3", "learner.local_steps=5", *extra]
    return [
        "run",
        "default",
        "--quiet",
        "--out",
        str(out),
        *(a for s in sets for a in ("--set", s)),
    ]


def test_sim_runs_the_default_scenario_on_a_users_npz(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = user_npz(tmp_path / "mine.npz")
    code = sim_main(run_args(tmp_path / "run", "data.dataset=npz", f"data.params.path={file}"))
    assert code == 0, capsys.readouterr().err
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    scenario = (tmp_path / "run" / "scenario.toml").read_text()
    assert str(file) in scenario


def test_sim_natural_partition_from_the_client_array(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = user_npz(tmp_path / "mine.npz", clients=6)
    extra = ("data.dataset=npz", f"data.params.path={file}", "data.partition=natural")
    code = sim_main(run_args(tmp_path / "run", *extra, "data.partition_params={}"))
    assert code == 0, capsys.readouterr().err
    code = sim_main(run_args(tmp_path / "run2", *extra, "data.partition_params={}", "topology.n=7"))
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "6 owners for 7 nodes" in err


def test_sim_missing_torchvision_root_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "no-such-root"
    extra = (
        "data.dataset=torchvision",
        "data.params.name=FashionMNIST",
        f"data.params.root={root}",
    )
    assert sim_main(run_args(tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"p2pfl-sim: error: data.params.root = '{root}': no ")
    assert "FashionMNIST/raw/train-images-idx3-ubyte" in err and "download = true" in err


def test_sim_missing_extra_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    assert sim_main(run_args(tmp_path / "run", "data.dataset=mnist1d")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'p2pfl-gossip[data]'" in err


def test_scenario_paths_resolve_against_the_scenario_file(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    source = folder / "s.toml"
    source.write_text("")
    document = {"data": {"dataset": "npz", "params": {"path": "data/mine.npz"}}}
    scenario = parse_scenario(document, source=str(source))
    assert scenario.data.params["path"] == str(folder / "data" / "mine.npz")
    shipped = parse_scenario(document, source="default.toml")  # no file: the current directory
    assert shipped.data.params["path"] == str(Path.cwd() / "data" / "mine.npz")
    with pytest.raises(ConfigError, match="data.params"):
        parse_scenario({"data": {"params": {"root": 3}}}, source=str(source))


def node_document(**data: object) -> dict[str, object]:
    return {
        "node": {"listen": "127.0.0.1:0", "key_file": "n.key"},
        "peers": [],
        "data": {"num_nodes": 3, "node_index": 2, "seed": 1, **data},
    }


def test_node_config_reads_a_relative_npz_with_natural_owners(tmp_path: Path) -> None:
    user_npz(tmp_path / "mine.npz", clients=5)
    document = node_document(dataset="npz", params={"path": "mine.npz"}, partition="natural")
    config = config_from_dict(document, base_dir=tmp_path)
    assert config.data.params["path"] == str(tmp_path / "mine.npz")
    learner = config.build_learner()
    assert learner is not None
    with pytest.raises(ConfigError, match=r"^data\.params\.path = "):
        config_from_dict(
            node_document(dataset="npz", params={"path": "absent.npz"}), base_dir=tmp_path
        ).build_learner()
    with pytest.raises(ConfigError, match=r"^data\.partition_params\.owners = "):
        config_from_dict(
            node_document(
                dataset="npz", params={"path": "mine.npz"}, partition_params={"owners": 1}
            ),
            base_dir=tmp_path,
        )
