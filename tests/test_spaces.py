"""Search space files: the shipped ones load, the define-by-run space samples what the file
says, and every kind of mistake is an error naming the file and the key.  No Ray here."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import yaml

from simdiffrec.config import Config
from simdiffrec.datasets import default_max_len
from tuner import spaces

DATASETS = ("beauty", "toys", "sports", "yelp", "ml-1m")
MINIMAL = {"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5}},
           "asha": {"max_epochs": 10, "grace_period": 2, "reduction_factor": 3}}


def write(tmp_path, content: dict):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_every_dataset_has_a_space_with_the_papers_ranges_and_points_first():
    assert set(spaces.shipped()) == {*DATASETS, "default", "demo"}
    for name in (*DATASETS, "default"):
        space = spaces.load(name)
        by_name = {p.name: p for p in space.params}
        # alpha down to the authors' code's 0.001, on a log scale, with tau down to 0.05
        assert (by_name["alpha"].low, by_name["alpha"].high, by_name["alpha"].log) == (1e-3, 0.5, True)
        assert (by_name["beta"].low, by_name["beta"].high) == (0.1, 0.5)
        assert by_name["lr"].log and by_name["dropout"].step == 0.1
        paper, sasrec, authors = space.points[:3]
        assert (paper["tau"], paper["k_noise"], paper["k_sample"], paper["lr"], paper["dropout"]) == (1.0, 25, 2, 1e-3, 0.5)
        assert (authors["alpha"], authors["tau"], authors["beta"]) == (1e-3, 0.05, 0.2)
        # SASRec-CE at the defaults, and each point at the default encoder and optimiser
        defaults = space.config({}, 1).replace(alpha=0.0, beta=0.0, sr_loss="ce", epochs=1)
        if "max_len" in sasrec:  # searched (ml-1m): the points keep the dataset's own
            defaults = defaults.replace(max_len=default_max_len(name))
        assert space.config(sasrec, 1) == defaults
        for point in (paper, authors):
            assert space.config(point, 1).replace(**{k: getattr(Config, k) for k in point if k != "family"}) \
                == Config(epochs=1, device="auto", **space.fixed)
        # the encoder and the optimiser are searched for both families
        assert by_name["layers"].low == 1 and by_name["hidden"].choices == (64, 128, 256)
        assert by_name["family"].choices == ("simdiffrec", "sasrec") and by_name["alpha"].when == ("family", ("simdiffrec",))
        assert by_name["k_noise"].choices == (1, 5, 10, 25, 50, 100)
        assert by_name["k_sample"].choices == (2, 3, 5, 10, 20, 50)
        assert (by_name["tau"].low, by_name["tau"].high, by_name["tau"].log) == (0.05, 1.0, True)
        assert by_name["tau_schedule"].choices == ("constant", "linear", "cosine")
        assert by_name["tau_end"].when == ("tau_schedule", ("linear", "cosine"))
        assert space.asha.grace_period <= space.asha.max_epochs
    best = {name: spaces.load(name).points[0] for name in ("beauty", "toys", "sports")}
    assert (best["beauty"]["alpha"], best["beauty"]["beta"]) == (0.4, 0.4)
    assert (best["toys"]["alpha"], best["toys"]["beta"]) == (0.1, 0.1)
    assert (best["sports"]["alpha"], best["sports"]["beta"]) == (0.1, 0.1)


def test_the_demo_space_is_a_short_search():
    """The README's first command: its trials end within a few epochs, ASHA stops some after two."""
    space = spaces.load("demo")
    assert space.asha.max_epochs <= 8 and space.asha.grace_period == 2 and space.fixed["patience"] <= 5
    assert {"alpha", "beta", "lr"} <= {p.name for p in space.params}


def test_define_by_run_samples_conditional_parameters_only_when_active():
    space = spaces.load("default")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    for _ in range(40):
        trial = study.ask()
        space(trial)
        params = trial.params
        if params["family"] == "sasrec":  # SASRec-CE: none of SimDiffRec's own settings sampled
            assert not set(params) & spaces.SIMDIFFREC_PARAMS
            cfg = space.config(params, epochs=7)
            assert (cfg.alpha, cfg.beta, cfg.sr_loss) == (0.0, 0.0, "ce")
            study.tell(trial, 0.0)
            continue
        assert ("tau_end" in params) == (params["tau_schedule"] != "constant")
        assert 1e-3 <= params["alpha"] <= 0.5 and params["k_noise"] in (1, 5, 10, 25, 50, 100)
        assert round(params["dropout"] * 10) == pytest.approx(params["dropout"] * 10)  # step 0.1
        cfg = space.config(params, epochs=7)
        assert isinstance(cfg, Config) and cfg.epochs == 7 and cfg.device == "auto"
        study.tell(trial, params["alpha"])


def test_points_to_evaluate_come_first_through_optuna():
    space = spaces.load("beauty")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    for point in space.points:
        study.enqueue_trial(point)
    trial = study.ask()
    space(trial)
    assert trial.params == space.points[0]


def test_fixed_settings_and_max_epochs_reach_the_config(tmp_path):
    space = spaces.load(write(tmp_path, {**MINIMAL, "fixed": {"hidden": 32, "heads": 2}}))
    cfg = space.config({"alpha": 0.2}, epochs=space.asha.max_epochs)
    assert (cfg.hidden, cfg.alpha, cfg.epochs) == (32, 0.2, 10)
    shorter = space.with_max_epochs(1)
    assert (shorter.asha.max_epochs, shorter.asha.grace_period) == (1, 1)


def test_the_shared_data_is_prepared_at_the_longest_max_len_a_trial_samples(tmp_path):
    assert spaces.load(write(tmp_path, MINIMAL)).data_max_len() is None  # the dataset's own
    assert spaces.load(write(tmp_path, {**MINIMAL, "fixed": {"max_len": 30}})).data_max_len() == 30
    for spec in ({"type": "categorical", "choices": [100, 50, 200]}, {"type": "int", "low": 50, "high": 200, "step": 50}):
        searched = {**MINIMAL, "parameters": {**MINIMAL["parameters"], "max_len": spec}}
        assert spaces.load(write(tmp_path, searched)).data_max_len() == 200
    ml = spaces.load("ml-1m")  # the one shipped dataset whose sequences are longer than 50
    assert ml.data_max_len() == 200 and all(point["max_len"] == 200 for point in ml.points)


def test_a_rung_judges_from_its_first_result_unless_the_space_says_otherwise(tmp_path):
    assert spaces.load(write(tmp_path, MINIMAL)).asha.min_rung_results == 1  # Ray's rule
    asha = {**MINIMAL["asha"], "min_rung_results": 3}
    space = spaces.load(write(tmp_path, {**MINIMAL, "asha": asha})).with_max_epochs(5)
    assert (space.asha.min_rung_results, space.asha.max_epochs) == (3, 5)


@pytest.mark.parametrize("change, key", [
    ({"parameters": {"alpah": {"type": "float", "low": 0.1, "high": 0.5}}}, "parameters.alpah"),
    ({"parameters": {"alpha": {"type": "float", "low": 0.5, "high": 0.1}}}, "parameters.alpha"),
    ({"parameters": {"alpha": {"type": "float", "low": 0.5, "high": 0.5}}}, "parameters.alpha"),
    ({"parameters": {"tau": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}}, "parameters.tau"),
    ({"parameters": {"alpha": {"type": "float", "low": "a", "high": 0.5}}}, "parameters.alpha.low"),
    ({"parameters": {"alpha": {"type": "normal", "low": 0.1, "high": 0.5}}}, "parameters.alpha.type"),
    ({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5, "sigma": 1}}}, "parameters.alpha.sigma"),
    ({"parameters": {"k_noise": {"type": "float", "low": 1.0, "high": 5.5}}}, "k_noise"),
    ({"parameters": {"layers": {"type": "float", "low": 1, "high": 3}}}, "parameters.layers.type"),
    ({"parameters": {"schedule": {"type": "int", "low": 1, "high": 3}}}, "parameters.schedule.type"),
    ({"parameters": {"k_noise": {"type": "int", "low": 1.5, "high": 5}}}, "parameters.k_noise.low"),
    ({"parameters": {"dropout": {"type": "float", "low": 0.1, "high": 1.0}}}, "dropout"),
    ({"parameters": {"k_sample": {"type": "categorical", "choices": []}}}, "parameters.k_sample.choices"),
    ({"parameters": {"tau_schedule": {"type": "categorical", "choices": ["constant", "cyclic"]}}}, "tau_schedule"),
    ({"parameters": {"tau_end": {"type": "float", "low": 0.1, "high": 1.0, "when": {"tau_schedule": ["linear"]}}}},
     "parameters.tau_end.when"),
    ({"parameters": {"epochs": {"type": "int", "low": 1, "high": 5}}}, "parameters.epochs"),
    ({"parameters": {"kcore": {"type": "int", "low": 3, "high": 5}}}, "parameters.kcore"),
    ({"fixed": {"hiddden": 32}}, "hiddden"),
    ({"fixed": {"hidden": "big"}}, "hidden"),
    ({"fixed": {"device": "cuda"}}, "fixed.device"),
    ({"fixed": {"alpha": 0.3}}, "parameters.alpha"),
    ({"points_to_evaluate": [{"alpha": 0.9}]}, "points_to_evaluate[0].alpha"),
    ({"points_to_evaluate": [{"beta": 0.2}]}, "points_to_evaluate[0].beta"),
    ({"asha": {"max_epochs": 10, "grace_period": 20, "reduction_factor": 3}}, "asha.grace_period"),
    ({"asha": {"max_epochs": 10, "grace_period": 2, "reduction_factor": 1}}, "asha.reduction_factor"),
    ({"asha": {"max_epochs": 10, "grace_period": 2}}, "asha.reduction_factor"),
    ({"asha": {"max_epochs": 10, "grace_period": 2, "reduction_factor": 3, "min_rung_results": 0}},
     "asha.min_rung_results"),
    ({"searcher": "tpe"}, "searcher"),
    ({"sampler": {"multivariate": "yes"}}, "sampler.multivariate"),
    ({"sampler": {"n_startup_trials": -1}}, "sampler.n_startup_trials"),
    ({"sampler": {"group": True}}, "sampler.group"),  # needs multivariate
    ({"sampler": {"seed": 3}}, "sampler.seed"),  # --seed seeds it
    ({"parameters": {"family": {"type": "categorical", "choices": ["sasrec", "gru4rec"]}}}, "parameters.family"),
    ({"parameters": {"family": {"type": "categorical", "choices": ["sasrec", "simdiffrec"]},  # sampled for SASRec
                     "alpha": {"type": "float", "low": 0.1, "high": 0.5}}}, "parameters.alpha"),
    ({"parameters": {"family": {"type": "categorical", "choices": ["sasrec", "simdiffrec"]},
                     "k_noise": {"type": "categorical", "choices": [1, 5], "when": {"family": ["sasrec", "simdiffrec"]}}}},
     "parameters.k_noise"),
])
def test_mistakes_name_the_file_and_the_key(tmp_path, change, key):
    path = write(tmp_path, {**MINIMAL, **change})
    with pytest.raises(ValueError) as err:
        spaces.load(path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_a_schedule_needing_tau_end_without_one_is_caught(tmp_path):
    path = write(tmp_path, {**MINIMAL, "parameters": {
        "tau_schedule": {"type": "categorical", "choices": ["constant", "linear"]}}})
    with pytest.raises(ValueError, match="tau_end"):
        spaces.load(path)


def test_unknown_space_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="beauty"):
        spaces.load("no-such-space")


def test_not_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("parameters: {alpha: [")
    with pytest.raises(ValueError, match="not valid YAML"):
        spaces.load(path)


def test_a_key_given_twice_names_the_file_line_and_key(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "parameters: {beta: {type: float, low: 0.1, high: 0.5}}\n")
    with pytest.raises(ValueError, match=rf"{path}:\d+: .*duplicate key 'parameters'"):
        spaces.load(path)


def test_tune_all_names_must_stay_inside_out(tmp_path):
    from tuner.jobs import plan_all

    for datasets in ("../x=data.txt", "a/b=data.txt", "..", "beauty,/etc=x"):
        with pytest.raises(ValueError, match="not a plain name"):
            plan_all(datasets, tmp_path, None, None)
    assert [j.out for j in plan_all("toys,my-data.v2=x.txt", tmp_path, None, None)] == \
        [tmp_path / "toys", tmp_path / "my-data.v2"]


def test_a_space_states_only_what_differs_from_its_base(tmp_path):
    """`base`: the base's parameters, fixed settings, asha and sampler entries, each overridden
    by key (null drops one); points replaced; the resolved mapping is what a search copies."""
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({
        "base": "default", "parameters": {"batch_size": None, "layers": {"type": "int", "low": 1, "high": 2}},
        "fixed": {"batch_size": 128}, "asha": {"grace_period": 7}, "sampler": {"constant_liar": False},
        "points_to_evaluate": [{"family": "sasrec", "layers": 1}]}))
    mine, default = spaces.load(tmp_path / "mine.yaml"), spaces.load("default")
    names = [p.name for p in mine.params]
    assert names == [p.name for p in default.params if p.name != "batch_size"]  # the base's order
    assert {p.name: p for p in mine.params}["layers"].high == 2 and mine.fixed["batch_size"] == 128
    assert mine.asha == default.asha.__class__(default.asha.max_epochs, 7, default.asha.reduction_factor,
                                               default.asha.min_rung_results)
    assert mine.sampler == {**default.sampler, "constant_liar": False} and default.sampler["constant_liar"]
    assert mine.points == ({"family": "sasrec", "layers": 1},)
    copy = yaml.safe_load(yaml.safe_dump(mine.raw, sort_keys=False))  # as a search writes it (write_yaml)
    assert spaces.parse(copy, "copy") == dataclasses.replace(mine, source="copy")  # it stands alone
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"base": "b.yaml", "asha": {"grace_period": 1}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": "a.yaml"}))
    with pytest.raises(ValueError, match="leads back to itself"):
        spaces.load(tmp_path / "a.yaml")
