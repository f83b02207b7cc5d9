"""The README's main job as written there (search, status, finalize, report on the shipped demo
data), at a smaller budget: fewer trials and epochs, one Ray instance for the chain."""

from __future__ import annotations

import shlex
from pathlib import Path

import pandas as pd

from simdiffrec.cli import main
from simdiffrec.config import read_yaml
from tuner import spaces

from .test_retrain import ray_cluster  # noqa: F401  (a fixture)

README = Path(__file__).resolve().parents[1] / "README.md"
SMALLER = {"--num-samples": "3", "--max-epochs": "2"}  # the budget this test changes, nothing else


def main_job() -> list[list[str]]:
    """The `simdiffrec` commands of the README's first command, as argument lists."""
    block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()  # continued lines joined
    command = next(line for line in lines if line.strip() and not line.startswith("#"))
    commands = [shlex.split(part) for part in command.split("&&")]
    return [args[1:] for args in commands if args[0] == ".venv/bin/simdiffrec"]


def smaller(args: list[str]) -> list[str]:
    """`args` with SMALLER's values; a search also gets SMALLER's epochs (the README leaves the space's)."""
    out = list(args)
    for i, flag in enumerate(args[:-1]):
        if flag in SMALLER:
            out[i + 1] = SMALLER[flag]
    if args[0] == "tune" and "--max-epochs" not in args:
        out += ["--max-epochs", SMALLER["--max-epochs"]]
    return out


def test_the_readme_main_job_runs_on_the_shipped_demo_and_ends_with_the_report(ray_cluster, tmp_path, monkeypatch,
                                                                                 capsys):
    commands = main_job()
    assert [args[0] for args in commands] == ["tune", "status", "finalize", "report"]
    assert commands[0][commands[0].index("--data") + 1] == "demo"
    monkeypatch.chdir(tmp_path)
    for args in commands:
        assert main(smaller(args)) == 0, args
    out = capsys.readouterr().out
    report = tmp_path / out.strip().splitlines()[-1]  # the chain's last line: the report's path
    assert report.name == "report.html" and report.is_file()
    search = tmp_path / commands[1][1]
    results = pd.read_parquet(search / "results.parquet")
    assert results["trial_id"].nunique() == 3 and results["epoch"].max() <= 2
    assert (search / "best_checkpoint" / "model.pt").is_file()
    assert read_yaml(search / "space.yaml") == spaces.resolve(spaces.find("demo"))  # the demo's own space
    final = pd.read_parquet(search / "final" / "final.parquet")
    # the search's best, its starting point and SASRec-CE at the defaults, with their baselines
    assert {"top-1", "baseline", "sasrec-defaults"} <= set(final["configuration"]) and set(final["seeds"]) == {2}
    assert (search / "final" / "final.md").read_text().startswith("**Winner: ")
    assert "Final comparison" in report.read_text() and (report.parent / "final.png").is_file()
