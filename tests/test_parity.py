"""The parity command on every public fixture folder: all outputs within the README tolerances."""
import pathlib

import numpy as np
import pytest

from glide_jax.parity.__main__ import check_outputs, compute, expected_outputs, main

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"
FOLDERS = sorted(p.name for p in FIXTURES.iterdir() if (p / "meta.json").is_file())


def test_all_public_folders_present():
    assert len(FOLDERS) == 19, FOLDERS


@pytest.mark.parametrize("folder", FOLDERS)
def test_parity_command(folder, tmp_path, capsys):
    out = tmp_path / "out.npz"
    rc = main([str(FIXTURES / folder), "--out", str(out), "--check"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    with np.load(out) as f:
        written = set(f.files)
    assert written == set(expected_outputs(FIXTURES / folder)), printed
    assert "FAIL" not in printed


def test_check_detects_a_wrong_array(tmp_path):
    folder = FIXTURES / "diffusion-linear-27"
    got = compute(folder)
    got["q_sample"] = got["q_sample"] + 1e-3
    rows = {name: ok for name, ok, _, _ in check_outputs(folder, got)}
    assert rows["q_sample"] is False
    assert sum(rows.values()) == len(rows) - 1


def test_not_a_fixture_folder(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "x.npz")]) == 2
    assert "not a parity fixture" in capsys.readouterr().err
