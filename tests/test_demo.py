"""glide_jax.demo (what `make demo` runs), on the test_tiny config: train part of the run, grid, resume."""

from __future__ import annotations

import pytest

from glide_jax import demo


@pytest.mark.slow
def test_demo_trains_part_writes_grid_and_says_how_to_continue(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert demo.main(["--workdir", str(workdir), "--config", "configs/test_tiny.py", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    grid = workdir / "demo_grid.png"
    assert grid.stat().st_size > 0
    assert "trained 4 of the config's 8 steps" in out
    assert f"python -m glide_jax.train --config configs/test_tiny.py --workdir {workdir}" in out
    assert (workdir / "checkpoints" / "4").is_dir()

    # the full length: resumes from step 4 and no longer prints the hint
    assert demo.main(["--workdir", str(workdir), "--config", "configs/test_tiny.py"]) == 0
    out = capsys.readouterr().out
    assert "to continue this run" not in out and (workdir / "checkpoints" / "8").is_dir()
