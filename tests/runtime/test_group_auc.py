"""The group AUC (GAUC) of evaluations: each group's AUC, weighted by its rows."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tidal.cli import main
from tidal.config import RunConfig
from tidal.data import generate
from tidal.data.criteo import CRITEO_COLUMNS, CRITEO_DENSE, CRITEO_SPARSE
from tidal.data.generate import auc
from tidal.errors import ConfigError, DataError
from tidal.runtime import Trainer
from tidal.runtime.trainer import group_auc, shown_gauc


def _reference(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, int]:
    """Group by group with the plain AUC: the weighted mean over groups of both classes."""
    aucs, weights = [], []
    for g in np.unique(groups):
        mine = groups == g
        if 0 < labels[mine].sum() < mine.sum():
            aucs.append(auc(labels[mine], scores[mine]))
            weights.append(mine.sum())
    return (float(np.average(aucs, weights=weights)), len(aucs)) if aucs else (None, 0)


@pytest.mark.parametrize("seed", range(5))
def test_group_auc_matches_a_group_by_group_reference_with_ties_and_one_class_groups(seed):
    rng = np.random.default_rng(seed)
    n = 2_000
    extremes = np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max])  # every int64 is a group
    groups = rng.choice(np.r_[extremes, rng.integers(-(1 << 62), 1 << 62, 60)], n)
    labels = rng.random(n) < rng.choice([0.0, 0.3, 1.0], n)  # some groups of one class
    scores = np.round(rng.normal(size=n) + labels, 1)  # ties, within groups and across them
    value, counted = group_auc(groups, labels, scores)
    expected, expected_counted = _reference(groups, labels, scores)
    assert counted == expected_counted > 0
    assert value == pytest.approx(expected, rel=1e-12)


def test_group_auc_of_no_group_with_both_classes_is_none():
    assert group_auc(np.arange(4), np.array([0, 1, 0, 1]), np.zeros(4)) == (None, 0)
    assert group_auc(np.zeros(0, np.int64), np.zeros(0), np.zeros(0)) == (None, 0)


def test_group_auc_refuses_nan_scores_as_the_auc_does():
    with pytest.raises(DataError, match=r"group AUC needs numeric scores, got 1 NaN of 3"):
        group_auc(np.array([1, 1, 1]), np.array([0, 1, 1]), np.array([np.nan, 0.5, 0.2]))


def _config(tmp_path, **data) -> dict:
    train = generate(tmp_path / "train", rows=6_000, seed=1)
    held_out = generate(tmp_path / "eval", rows=2_000, seed=1, split=1)
    return {
        "data": {"train": train.paths, "eval": held_out.paths, "batch_size": 500, **data},
        "features": [
            *({"kind": "sparse", "name": c, "columns": [c], "table": "ids"} for c in CRITEO_SPARSE),
            *({"kind": "dense", "name": c, "column": c, "transform": "log"} for c in CRITEO_DENSE),
            {"kind": "label", "name": "click", "column": "label"},
        ],
        "tables": [{"name": "ids", "dim": 8, "optimizer": {"kind": "adagrad", "lr": 0.05}}],
        "model": {"kind": "dlrm", "bottom_sizes": [16], "hidden_sizes": [32]},
        "training": {"epochs": 1, "lr": 0.003, "log_every": 10, "eval_every": 6, "run_dir": str(tmp_path / "run")},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run evaluated with C1 as its group: its trainer and config."""
    config = _config(tmp_path_factory.mktemp("gauc"), eval_group_by="C1")
    trainer = Trainer(RunConfig(**config))
    trainer.fit()
    return trainer, config


def _with_column(source: str, target, column: int, values) -> str:  # type: ignore[no-untyped-def]
    """`source`'s TSV rows with field `column` replaced by `values(row number)`."""
    lines = open(source).read().splitlines()
    rows = [line.split("\t") for line in lines]
    for i, row in enumerate(rows):
        row[column] = values(i)
    target.write_text("".join("\t".join(row) + "\n" for row in rows))
    return str(target)


def test_a_run_logs_and_reports_the_group_auc_of_its_evaluations(trained):
    trainer, config = trained
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12] and all(r["group_by"] == "C1" for r in evals)
    final = records[-1]["eval"]
    assert 0.0 < final["gauc"]["click"] < 1.0 and final["gauc_groups"]["click"] > 10
    assert final["gauc"] == evals[-1]["gauc"]


def test_one_group_gives_the_auc_and_rows_without_an_id_belong_to_none(trained, tmp_path):
    trainer, config = trained
    source = config["data"]["eval"][0]
    one_group = _with_column(source, tmp_path / "one.tsv", 14, lambda i: "same")  # C1 is column 14
    whole = trainer.evaluate([one_group])
    assert whole.gauc["click"] == pytest.approx(whole.auc["click"], rel=1e-12) and whole.gauc_groups == {"click": 1}
    by_c7 = trainer.evaluate([_with_column(source, tmp_path / "c7.tsv", 20, lambda i: "same")], group_by="C7")
    assert by_c7.gauc["click"] == pytest.approx(by_c7.auc["click"], rel=1e-12) and by_c7.gauc_groups == {"click": 1}
    with pytest.raises(ConfigError, match=r"^the group feature \(data\.eval_group_by, --group-by\) is a sparse "
                                          r"feature's name, got 5$"):
        trainer.evaluate([one_group], group_by=5)
    ungrouped = trainer.evaluate([one_group], group_by=False)  # as --no-group-by: none, though the config names C1
    assert ungrouped.group_by is None and ungrouped.gauc is None and ungrouped.auc == whole.auc
    with_missing = tmp_path / "with-missing.tsv"
    without_id = _with_column(source, tmp_path / "none.tsv", 14, lambda i: "")
    with_missing.write_text(open(one_group).read() + open(without_id).read())
    partly = trainer.evaluate([str(with_missing)])
    assert partly.gauc == whole.gauc and partly.gauc_rows == 2_000 and partly.rows == 4_000  # the rows without an id
    assert shown_gauc(partly, "click").endswith(" over 1 group (2,000 rows without an id of C1 left out)")
    own = trainer.evaluate([_with_column(source, tmp_path / "own.tsv", 14, str)])  # a group a row: one class each
    assert own.gauc == {"click": None} and own.gauc_groups == {"click": 0}


def test_rows_given_the_default_id_of_a_missing_value_belong_to_no_group(trained, tmp_path):
    trainer, config = trained
    source = config["data"]["eval"][0]
    half = _with_column(source, tmp_path / "half.tsv", 14, lambda i: "" if i % 2 else "same")
    defaulted = Trainer(RunConfig(**{**config, "features": [{**f, "missing": "default"} if f["name"] == "C1" else f
                                                            for f in config["features"]]}))
    defaulted.model.load_state_dict(trainer.model.state_dict())
    evaluation = defaulted.evaluate([half])
    kept = _with_column(source, tmp_path / "kept.tsv", 14, lambda i: "same")
    only_kept = defaulted.evaluate([str(_every_other(kept, tmp_path / "only-kept.tsv"))])
    assert evaluation.gauc_groups == {"click": 1}  # the rows without a C1 are not a second group
    assert evaluation.gauc["click"] == pytest.approx(only_kept.auc["click"], rel=1e-12)


def _every_other(source: str, target):  # type: ignore[no-untyped-def]
    """The even rows of `source`."""
    target.write_text("".join(open(source).readlines()[::2]))
    return target


def test_eval_on_the_command_line_groups_by_the_feature_it_is_given(trained, capsys, tmp_path):
    trainer, config = trained
    assert main(["eval", "--checkpoint", str(trainer.run_dir), "--data", *config["data"]["eval"],
                 "--group-by", "C2"]) == 0
    assert re.search(r"click: AUC 0\.\d+  log loss \d\.\d+  NE 0\.\d+  calibration \d\.\d+ on 2,000 rows  "
                     r"GAUC by C2 0\.\d+ over [\d,]+ groups\n",
                     capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(trainer.run_dir), "--data", *config["data"]["eval"],
                 "--group-by", "I1"]) == 2
    assert "the group feature (data.eval_group_by, --group-by) is 'I1' (a dense feature); expected a sparse feature " \
           "of one id a row; one of ['C1', " in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(trainer.run_dir), "--data", *config["data"]["eval"]]) == 0
    assert "GAUC by C1" in capsys.readouterr().out  # the run's group
    assert main(["eval", "--checkpoint", str(trainer.run_dir), "--data", *config["data"]["eval"],
                 "--no-group-by"]) == 0
    out = capsys.readouterr().out
    assert "click: AUC 0." in out and "GAUC" not in out
    assert main(["eval", "--checkpoint", str(trainer.run_dir), "--data", *config["data"]["eval"],
                 "--no-group-by", "--group-by", "C2"]) == 2
    captured = capsys.readouterr()
    assert "--group-by C2 and --no-group-by contradict each other" in captured.err
    assert "checkpoint" not in captured.out  # refused before the checkpoint loads (an audit's find)
    assert main(["eval", "--checkpoint", str(trainer.run_dir), "--data", str(tmp_path / "gone.tsv")]) == 2
    captured = capsys.readouterr()
    assert f"no data file at {tmp_path / 'gone.tsv'}" in captured.err and "checkpoint" not in captured.out


def test_the_group_feature_is_checked_with_the_config(tmp_path):
    config = _config(tmp_path, eval_group_by="nope")
    with pytest.raises(ConfigError, match=r"data.eval_group_by is 'nope'; expected a sparse feature of one id a row; "
                                          r"one of \['C1'"):
        RunConfig(**config)
    config["features"][0]["separator"] = "|"
    with pytest.raises(ConfigError, match=r"expected a sparse feature of one id a row; one of \['C10', "):
        RunConfig(**config)  # bags are not offered
    config["data"]["eval_group_by"] = "C1"
    with pytest.raises(ConfigError, match=r"data.eval_group_by is 'C1', a multi-value bag \(separator '\|'\)"):
        RunConfig(**config)
    config = _config(tmp_path, eval_group_by="C1", eval=None)
    config["training"]["eval_every"] = None
    with pytest.raises(ConfigError, match="data.eval_group_by is 'C1', but data.eval names no files to evaluate on"):
        RunConfig(**config)


def test_eval_reads_files_as_its_flags_say_and_checks_their_layout_first(trained, tmp_path, capsys):
    trainer, config = trained
    source = config["data"]["eval"][0]
    lines = open(source).read().splitlines(keepends=True)

    def evaluate(path, *flags: str) -> tuple[int, str, str]:
        code = main(["eval", "--checkpoint", str(trainer.run_dir), "--data", str(path), *flags])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    unnamed = tmp_path / "rows.data"
    unnamed.write_text("".join(lines))
    code, _, err = evaluate(unnamed)
    assert code == 2 and "cannot tell the format from the suffix '.data'" in err and "--format" in err
    code, _, err = evaluate(unnamed, "--format", "tsv")
    assert code == 0, err
    code, _, err = evaluate(unnamed, "--format", "csv")  # an audit's find: it said to turn off the CSV header
    assert code == 2 and "a tab-separated file, read as CSV; read it as TSV (format: tsv)" in err
    narrow = tmp_path / "narrow.tsv"
    narrow.write_text("".join("\t".join(line.split("\t")[:3]) + "\n" for line in lines))
    code, _, err = evaluate(narrow)
    assert code == 2 and "its first 20 records have 3 fields (tab-separated), expected 40" in err
    fifth_bad = tmp_path / "fifth-bad.tsv"
    fifth_bad.write_text("".join(line if i % 5 else "x\t" + line for i, line in enumerate(lines * 6)))  # judged
    # from 10,000 rows on
    code, _, err = evaluate(fifth_bad)
    assert code == 2 and re.search(r"were bad \(20\.0%\), more than the 1,200 that max_bad_fraction 0\.1 allows: .* "
                                   r"Fix the files, or raise data\.max_bad_fraction \(read_batches: max_bad_fraction; 1\.0 skips any "
                                   r"number\)", err)
    code, _, err = evaluate(fifth_bad, "--max-bad-fraction", "0.1")  # the flag the user typed is the one named
    assert code == 2 and "or raise --max-bad-fraction (read_batches: max_bad_fraction; 1.0 skips any number)" in err
    code, out, _ = evaluate(fifth_bad, "--max-bad-fraction", "0.5")
    assert code == 0 and "on 9,600 rows" in out and "bad rows: 2,400 bad rows skipped" in out
    code, _, err = evaluate(fifth_bad, "--max-bad-fraction", "2")
    assert code == 2 and "--max-bad-fraction: Input should be less than or equal to 1" in err and "data." not in err
    code, _, err = evaluate(source, "--columns", "a", "b")  # named by the flag that set them
    assert code == 2 and "which --columns lacks; it lists ['a', 'b']" in err and "data.columns" not in err
    code, _, err = evaluate(source, "--no-csv-header")  # settings no file would read are refused, as training's
    assert code == 2 and "--no-csv-header is for CSV files, but these files are tsv: leave it out" in err
    headed = tmp_path / "headed.csv"
    headed.write_text(",".join(CRITEO_COLUMNS) + "\n" + "".join(line.replace("\t", ",") for line in lines[:50]))
    code, _, err = evaluate(headed, "--columns", *CRITEO_COLUMNS)
    assert code == 2 and "--columns names the columns of TSV files" in err and "these files are csv" in err
