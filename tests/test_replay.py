"""bench/replay.py: a search replayed on recorded curves decides as Ray's schedulers would, and
its table tells a policy that drops the best configuration from one that keeps it."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from simdiffrec.config import write_yaml
from tuner import recovery, spaces
from tuner.protocol import METRIC

BENCH = Path(__file__).parents[1] / "bench"
spec = importlib.util.spec_from_file_location("replay", BENCH / "replay.py")
replay = importlib.util.module_from_spec(spec)
sys.modules["replay"] = replay
spec.loader.exec_module(replay)
spec = importlib.util.spec_from_file_location("replay_sets", BENCH / "replay_sets.py")
replay_sets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(replay_sets)

SPACE = {"parameters": {"alpha": {"type": "float", "low": 0.001, "high": 0.5, "log": True},
                        "k_noise": {"type": "categorical", "choices": [1, 25]}},
         "fixed": {"patience": 5}, "points_to_evaluate": [{"alpha": 0.1, "k_noise": 25}],
         "asha": {"max_epochs": 40, "grace_period": 2, "reduction_factor": 3, "min_rung_results": 1}}


def write_set(folder: Path, worths: list[float], speeds: list[float], epochs: int = 40,
              delays: list[int] | None = None, seconds: list[float] | None = None) -> Path:
    """A set whose configuration c rises to worths[c] at the pace speeds[c] (epochs to 63%), after
    delays[c] epochs of a slowly falling plateau (none by default); its epochs take seconds[c]
    (no seconds recorded by default)."""
    rng = np.random.default_rng(0)
    configs = pd.DataFrame({"config": range(len(worths)), "start": [True] + [False] * (len(worths) - 1),
                            "alpha": np.geomspace(0.001, 0.5, len(worths)), "k_noise": [25, 1] * (len(worths) // 2)})
    rows = []
    for c, (worth, speed, delay) in enumerate(zip(worths, speeds, delays or [0] * len(worths))):
        epoch = np.arange(1, epochs + 1)
        rising = worth * (1 - np.exp(-(epoch - delay) / speed))
        for seed in (0, 1):
            curve = np.where(epoch > delay, rising, 0.01 - 1e-4 * epoch) + rng.normal(0, 1e-5, epochs)
            rows += [{"config": c, "seed": seed, "epoch": e + 1, "valid/NDCG@10": v, "test/NDCG@10": 0.9 * v,
                      **({"seconds": seconds[c]} if seconds else {})} for e, v in enumerate(curve)]
    folder.mkdir()
    configs.to_parquet(folder / "configs.parquet")
    pd.DataFrame(rows).to_parquet(folder / "curves.parquet")
    (folder / "space.yaml").write_text(json.dumps(SPACE))
    write_yaml(folder / "set.yaml", {"space": str(folder / "space.yaml")})
    return folder


def test_the_replayed_asha_decides_as_the_searchs_scheduler():
    """On a random stream of results, the replay's ASHA stops exactly the trials that
    tuner.recovery.ResumableASHA (Ray's ASHA with min_rung_results) stops."""
    rng = np.random.default_rng(3)
    for brackets_min_rung in ((1, 1), (1, 3), (3, 1)):
        brackets, m = brackets_min_rung
        policy = replay.Policy("asha", cap=27, grace=1, rf=3.0, brackets=brackets, min_rung=m)
        ray_asha = recovery.ResumableASHA(metric=METRIC, mode="max", time_attr="epoch", max_t=27, grace_period=1,
                                        reduction_factor=3, brackets=brackets, min_rung_results=m)
        ours = replay.Asha(policy, np.random.default_rng(0))
        stopped_ray, stopped_ours = set(), set()
        trials = [SimpleNamespace(trial_id=f"t{i}", has_reported_at_least_once=False) for i in range(12)]
        for i, trial in enumerate(trials):
            np.random.seed(i)  # Ray draws a trial's bracket from numpy's global generator
            ray_asha.on_trial_add(None, trial)
            # the bracket Ray drew (its private state, Ray 2.60)
            ours.of[i] = ours.brackets[ray_asha._brackets.index(ray_asha._trial_info[trial.trial_id])]
        for epoch in range(1, 28):
            for i, trial in enumerate(trials):
                if i in stopped_ray:
                    continue
                value = float(rng.random())
                if ray_asha.on_trial_result(None, trial, {"epoch": epoch, METRIC: value}) == "STOP":
                    stopped_ray.add(i)
                if ours.result(i, epoch, value):
                    stopped_ours.add(i)
        assert stopped_ours == stopped_ray and stopped_ray


@dataclasses.dataclass(eq=False)  # hashed by identity, as Ray's schedulers key their tables by trial
class TrialStub:
    trial_id: str
    status: str
    is_saving: bool = False


def test_the_replayed_hyperband_decides_as_rays_with_a_concurrency_limit():
    """Trials one epoch a tick, at most `slots` in flight (paused ones count, as under the search's
    concurrency limit), a new one whenever a slot frees: the replay's synchronous Hyperband stops
    each trial at the epoch Ray's HyperBandScheduler stops it."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import HyperBandScheduler, TrialScheduler

    for slots, rf, cap in ((3, 3.0, 9), (8, 2.0, 16), (20, 3.0, 27)):
        rng = np.random.default_rng(slots)
        ray_hb = HyperBandScheduler(time_attr="epoch", metric=METRIC, mode="max", max_t=cap, reduction_factor=rf)
        ours = replay.HyperBand(replay.Policy("hyperband", cap, rf=rf))

        class Controller:
            def stop_trial(self, trial):  # as Tune's TuneController.stop_trial
                if trial.status == Trial.PAUSED:
                    ray_hb.on_trial_remove(self, trial)
                elif trial.status == Trial.RUNNING:
                    ray_hb.on_trial_complete(self, trial, {})
                trial.status = Trial.TERMINATED

        controller, trials, epoch = Controller(), [], {}
        ends = {"ray": {}, "ours": {}}
        running = {"ray": set(), "ours": set()}
        while len(trials) < 40 or running["ray"] or any(t.status == Trial.PAUSED for t in trials):
            in_flight = [t for t in trials if t.status in (Trial.RUNNING, Trial.PAUSED)]
            for _ in range(slots - len(in_flight)):
                if len(trials) == 40:
                    break
                i = len(trials)
                trials.append(TrialStub(f"t{i}", Trial.RUNNING))
                ray_hb.on_trial_add(controller, trials[i])
                ours.add(i)
                epoch[i] = 0
                running["ray"].add(i), running["ours"].add(i)
            if not running["ray"]:
                break
            for i in sorted(running["ray"] | running["ours"]):
                assert (i in running["ray"]) == (i in running["ours"]), f"trial {i} runs in one only"
                epoch[i] += 1
                value = float(rng.random())
                decision = ray_hb.on_trial_result(controller, trials[i], {"epoch": epoch[i], METRIC: value})
                if decision == TrialScheduler.PAUSE:
                    trials[i].status = Trial.PAUSED
                elif decision == TrialScheduler.STOP:
                    controller.stop_trial(trials[i])
                if epoch[i] == ours.milestone(i):
                    stop, good = ours.result(i, epoch[i], value)
                    for j in stop:
                        ends["ours"][j] = epoch[j]
                        running["ours"].discard(j)
                    running["ours"] |= set(good)
                    if i not in good:
                        running["ours"].discard(i)
            for t in trials:  # what Tune's choose_trial_to_run resumes, and what has ended
                n = int(t.trial_id[1:])
                bracket = ray_hb._trial_info[t][0]
                if t.status == Trial.PAUSED and t in bracket.trials_to_unpause:
                    t.status = Trial.RUNNING
                if t.status == Trial.TERMINATED and n not in ends["ray"]:
                    ends["ray"][n] = epoch[n]
            running["ray"] = {int(t.trial_id[1:]) for t in trials if t.status == Trial.RUNNING}
        assert ends["ours"] == ends["ray"] and len(ends["ray"]) == 40
        # 3 in flight never fill the first bracket (3 live trials that go to the cap) beyond what it
        # empties: every trial lands there and none stops early; with more in flight, some do
        assert (min(ends["ray"].values()) == cap) == (slots == 3)


def test_hyperband_stops_nothing_when_fewer_trials_run_at_once_than_its_first_bracket_holds(tmp_path):
    """Cap 27, factor 3: the first bracket takes 4 trials to the cap.  Two at a time never fill it
    (a trial that ends leaves it), so every trial lands there: the epochs of no stopping.  Eight at
    a time fill it and open the brackets that halve."""
    curves = replay.Curves.load(write_set(tmp_path / "set", [0.05, 0.06, 0.05, 0.08] * 3, [2, 2, 2, 12] * 3))
    space = spaces.parse(SPACE, "space")
    spent = {}
    for kind, workers in itertools.product(("none", "hyperband"), (2, 8)):
        policy = replay.Policy(kind, 27, rf=3.0, patience=40)
        spent[kind, workers] = [replay.simulate(curves, space, policy, "random", 12, workers, 5, seed)["epochs"]
                                for seed in range(5)]
    assert spent["hyperband", 2] == spent["none", 2] == [12 * 27] * 5
    assert max(spent["hyperband", 8]) < min(spent["none", 8])


def test_natural_end_is_the_cap_or_patience_epochs_without_progress():
    curve = np.array([0.1, 0.2, 0.3, 0.25, 0.2, 0.1, 0.05, 0.4])
    assert replay.natural_end(curve, cap=8, patience=3) == 6
    assert replay.natural_end(curve, cap=5, patience=3) == 5
    assert replay.natural_end(curve, cap=20, patience=10) == 8  # the recorded curve ends first


def test_a_grace_period_too_short_for_the_slow_best_configuration_shows_in_the_table(tmp_path):
    """The best configuration rises slowest: no stopping keeps and picks it; ASHA judging at
    epoch 2 drops it, and the table says so (kept 0, regret above 0) at a fraction of the epochs."""
    worths = [0.05, 0.06, 0.05, 0.08, 0.05, 0.06]
    speeds = [2, 2, 2, 12, 2, 2]
    curves = replay.Curves.load(write_set(tmp_path / "set", worths, speeds))
    space = spaces.parse(SPACE, "space")
    policies = [replay.Policy("none", 40), replay.Policy("asha", 40, 2, 3.0, 1, 1)]
    frame = replay.table(curves, space, policies, ["random"], trials=6, workers=2, patience=5, orders=20)
    none, asha = frame.set_index("policy").loc[["none cap40", "asha g2 rf3 b1 m1 cap40"]].to_dict("records")
    assert none["p_best_kept"] == 1.0 and none["p_best_picked"] == 1.0 and none["regret_valid"] == pytest.approx(0, abs=1e-4)
    gap = curves.worth_valid[3] - curves.worth_valid[1]  # the best against the second best
    assert asha["p_best_kept"] == 0.0 and asha["regret_valid"] == pytest.approx(gap, abs=1e-3)
    assert asha["epochs_pct"] < none["epochs_pct"] == 100
    assert none["p_near_best"] == 1.0 and asha["p_near_best"] == 0.0  # the gap is far above the seeds' spread
    # with seeds that spread by more than the gap, the second best is as good a pick as the best
    noisy = dataclasses.replace(curves, seed_std=gap + 1e-3)
    frame = replay.table(noisy, space, policies[1:], ["random"], trials=6, workers=2, patience=5, orders=20)
    assert frame.loc[0, "p_best_kept"] == 0.0 and frame.loc[0, "p_near_best"] == 1.0


def test_a_trial_of_slow_epochs_reaches_its_rungs_late_and_is_judged_against_more(tmp_path):
    """The best configuration (the starting point, so always started first) rises slowly and its
    epochs take 10 s, the others' 1 s.  One epoch a time unit, it is first at every rung and ASHA
    keeps it; at the recorded pace the fast ones fill its first rung with higher values before it
    arrives, and ASHA stops it there, which also saves most of the search's seconds."""
    folder = write_set(tmp_path / "set", [0.08, 0.05, 0.06, 0.05, 0.06, 0.05], [12, 2, 2, 2, 2, 2],
                       seconds=[10, 1, 1, 1, 1, 1])
    curves = replay.Curves.load(folder)
    assert curves.pace[0, 0] == 10 and curves.pace[3, 1] == 1
    space = spaces.parse(SPACE, "space")
    policies = [replay.Policy("none", 40), replay.Policy("asha", 40, 2, 3.0, 1, 1)]
    by_pace = {paced: replay.table(curves, space, policies, ["random"], trials=6, workers=6, patience=5, orders=10,
                                   paced=paced).set_index("policy") for paced in (False, True)}
    uniform, paced = (by_pace[p].loc["asha g2 rf3 b1 m1 cap40"] for p in (False, True))
    assert uniform["p_best_kept"] == 1.0 and paced["p_best_kept"] == 0.0
    assert paced["time_pct"] < paced["epochs_pct"] < 100


def test_one_table_compares_the_spaces_patience_with_a_longer_one(tmp_path):
    """The best configuration sits on a plateau for 10 epochs before it rises: the space's patience
    (5) ends it there, patience 15 keeps and picks it, and both rows count epochs against the same
    no-stopping reference (the longest cap and patience)."""
    worths, speeds, delays = [0.05, 0.06, 0.05, 0.08, 0.05, 0.06], [2] * 6, [0, 0, 0, 10, 0, 0]
    curves = replay.Curves.load(write_set(tmp_path / "set", worths, speeds, delays=delays))
    space = spaces.parse(SPACE, "space")
    candidates = replay.policies(space, [40], [None, 15])
    assert [p.name for p in candidates[:2]] == ["none cap40", "asha g3 rf2 b1 m1 cap40"]
    assert "none cap40 p15" in [p.name for p in candidates]
    wanted = [p for p in candidates if p.name in ("none cap40", "none cap40 p15")]
    frame = replay.table(curves, space, wanted, ["random"], trials=6, workers=2, patience=5, orders=10)
    short, longer = frame.set_index("policy").loc[["none cap40", "none cap40 p15"]].to_dict("records")
    assert short["p_best_picked"] == 0.0 and short["regret_valid"] == pytest.approx(0.02, abs=1e-3)
    assert longer["p_best_picked"] == 1.0 and longer["regret_valid"] == pytest.approx(0, abs=1e-4)
    assert short["epochs_pct"] < longer["epochs_pct"] == 100


def test_across_sets_a_policy_ranks_by_its_worst_set(tmp_path):
    """ASHA at grace 2 keeps the best configuration where every configuration rises fast and
    drops it where the best rises slowly: across both sets it ranks below no stopping, by the set
    it fails on, whatever the other says."""
    space = spaces.parse(SPACE, "space")
    fast = replay.Curves.load(write_set(tmp_path / "fast", [0.05, 0.06, 0.05, 0.08, 0.05, 0.06], [2] * 6))
    slow = replay.Curves.load(write_set(tmp_path / "slow", [0.05, 0.06, 0.05, 0.08, 0.05, 0.06], [2, 2, 2, 12, 2, 2]))
    policies = [replay.Policy("none", 40), replay.Policy("asha", 40, 2, 3.0, 1, 1)]
    frames = {name: replay.table(curves, space, policies, ["random"], trials=6, workers=2, patience=5, orders=10)
              for name, curves in (("fast", fast), ("slow", slow))}
    table = replay_sets.across(frames).set_index("policy")
    asha = table.loc["asha g2 rf3 b1 m1 cap40 (shipped)"]
    assert asha["fast near"] == 1.0 and asha["slow near"] == 0.0 and asha["worst near"] == 0.0
    assert asha["worst epochs"] == max(asha["fast epochs"], asha["slow epochs"]) < 100
    assert list(table.index) == ["none cap40", "asha g2 rf3 b1 m1 cap40 (shipped)"]


def test_the_searchers_each_try_every_configuration_once(tmp_path):
    curves = replay.Curves.load(write_set(tmp_path / "set", [0.05] * 6, [2] * 6))
    space = spaces.parse(SPACE, "space")
    for kind in ("random", "tpe", "tpe-mv"):
        searcher = replay.Searcher(kind, curves, space, np.random.default_rng(0), 0)
        order = [searcher.next(i) for i in range(6)]
        assert order[0] == 0 and sorted(order) == list(range(6)), kind  # the space's point first
        assert searcher.next(6) is None


def test_json_lines_name_the_shipped_policy(tmp_path):
    folder = write_set(tmp_path / "set", [0.05, 0.06, 0.07, 0.05], [2, 3, 4, 2])
    run = subprocess.run([sys.executable, str(BENCH / "replay.py"), str(folder), "--json", "--orders", "3",
                          "--caps", "40", "--patience", "5,12"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["policy"] for r in rows if r["shipped"]] == ["asha g2 rf3 b1 m1 cap40"]  # the space's patience, 5
    assert {"asha g3 rf3 b1 m1 cap40 p12", "none cap40 p12"} <= {r["policy"] for r in rows}
    assert {"epochs_pct", "p_best_kept", "regret_valid", "regret_test_p90"} <= set(rows[0])


def test_a_bad_flag_or_set_gets_one_line_naming_it(tmp_path, capsys):
    folder = write_set(tmp_path / "set", [0.05, 0.06], [2, 3])
    short = write_set(tmp_path / "short", [0.05, 0.06], [2, 3])
    write_yaml(short / "set.yaml", {"space": str(short / "space.yaml"), "patience": 8})  # its runs stopped at 8
    cases = [(replay.main, [str(folder), "--patience", "10,x"], "argument --patience: invalid"),
             (replay_sets.main, [str(folder), str(short), "--patience", "5,12"],
              "ended after 8 epochs without progress; a replay's patience cannot be longer (--patience 12)"),
             (replay.main, [str(folder), "--caps", "0"], "argument --caps: invalid"),
             (replay.main, [str(folder), "--caps", "40", "--policies", "none cap40;asha g2 rf3 cap40"],
              "--policies: no such policy at these caps and patiences: asha g2 rf3 cap40 ("),
             (replay.main, [str(tmp_path)], f"{tmp_path} is not a calibration set"),
             (replay_sets.main, [str(folder), str(tmp_path / "gone")], "gone is not a calibration set")]
    for main, argv, said in cases:
        with pytest.raises(SystemExit) as stopped:  # argparse's one line, not an exception's traceback
            main(argv)
        assert stopped.value.code == 2 and said in capsys.readouterr().err, argv


def test_the_header_says_at_what_pace_the_trials_ran(tmp_path, capsys):
    """A set without recorded seconds is replayed at one epoch a time unit, and says so."""
    untimed = write_set(tmp_path / "untimed", [0.05, 0.06], [2, 3])
    timed = write_set(tmp_path / "timed", [0.05, 0.06], [2, 3], seconds=[1.0, 4.0])
    for folder, said in ((untimed, "at one epoch a time unit (the set recorded no seconds)"),
                         (timed, "at each run's recorded seconds per epoch")):
        assert replay.main([str(folder), "--orders", "2", "--caps", "40"]) == 0
        assert said in capsys.readouterr().out.splitlines()[0]


def test_settings_effect_groups_configurations_by_value_and_ranks_the_best(tmp_path):
    """bench/settings_effect.py: a categorical value per row, a varied float cut into three bins,
    the configurations ranked by their worth (the best converged valid NDCG@10, mean over seeds)."""
    folder = write_set(tmp_path / "set", worths=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], speeds=[3] * 8)
    run = subprocess.run([sys.executable, str(BENCH / "settings_effect.py"), str(folder), "--top", "3"],
                         capture_output=True, text=True, check=True)
    best = [line.split("|")[1].strip() for line in run.stdout.splitlines() if line.startswith("| ")][1:4]
    assert best == ["7", "6", "5"]  # the three best configurations, best first
    def rows(setting: str) -> list[str]:  # the table under the setting's name, without its header
        return run.stdout.split(f"\n{setting}\n\n")[1].split("\n\n")[0].splitlines()[2:]

    k_noise = rows("k_noise")
    # k_noise alternates 25, 1: configurations 1, 3, 5, 7 (worth median 0.5) have 1
    assert [row.split("|")[1:4] for row in k_noise] == [[" 1 ", " 4 ", " 0.5 "], [" 25 ", " 4 ", " 0.4 "]]
    alpha = rows("alpha")
    assert len(alpha) == 3 and sum(int(row.split("|")[2]) for row in alpha) == 8  # three bins hold all eight
