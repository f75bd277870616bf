"""Weighted bags ("a:0.5|b:2") from a file to a served score: the weights reach the
pooling in training and in serving, and a value without its weight is a bad row there
and a 400 here."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from tidal.config import RunConfig
from tidal.errors import ConfigError, DataError, TidalError
from tidal.runtime import Trainer
from tidal.serving import Predictor, RequestError, Service, export, load_bundle
from tidal.serving.protocol import decode_request, infer_request, input_specs

ROWS = 6_000


def _write_csv(path, rng: np.random.Generator) -> None:
    """Each row holds the same two tags; only their weights tell the label (up if the
    first outweighs the second), so a model that did not see the weights stays at chance."""
    up, down = rng.uniform(0, 1, ROWS), rng.uniform(0, 1, ROWS)
    labels = (up > down).astype(int)
    lines = ["label,user,tags"]
    lines += [f"{y},u{i % 50},up:{a:.4f}|down:{b:.4f}" for i, (y, a, b) in enumerate(zip(labels, up, down))]
    lines += ["1,u1,up:0.5|down", "0,u2,up:0.5|down:1e39"]  # a weight missing, one past float32's range
    path.write_text("\n".join(lines) + "\n")


def _config(tmp_path) -> RunConfig:
    _write_csv(tmp_path / "train.csv", np.random.default_rng(0))
    return RunConfig(
        data={"train": str(tmp_path / "train.csv"), "batch_size": 256},
        features=[
            {"kind": "sparse", "name": "user", "columns": ["user"], "table": "ids", "side": "user"},
            {"kind": "sparse", "name": "tags", "columns": ["tags"], "table": "ids", "separator": "|",
             "weight_separator": ":"},
            {"kind": "label", "name": "click", "column": "label"},
        ],
        tables=[{"name": "ids", "dim": 4, "optimizer": {"kind": "adagrad", "lr": 0.1}}],
        model={"kind": "dlrm", "bottom_sizes": [4], "hidden_sizes": [16]},
        training={"epochs": 3, "lr": 0.01, "log_every": 1000, "run_dir": str(tmp_path / "run")},
        serving={"buckets": [1, 8, 64], "max_batch_rows": 64, "chunk_rows": 64},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("weighted")
    trainer = Trainer(_config(root))
    summary = trainer.fit()
    bundle = load_bundle(export(trainer.run_dir, root / "bundle"))
    return trainer, summary, Predictor(bundle), bundle


def _rows(tags: list[str]) -> pa.RecordBatch:
    return pa.record_batch({"label": ["0"] * len(tags), "user": ["u1"] * len(tags), "tags": tags})


def _request(trainer, rows: pa.RecordBatch) -> bytes:
    return json.dumps(infer_request(rows, input_specs(trainer.config))).encode()


def test_training_reads_the_weights_and_counts_values_without_one_as_bad_rows(trained):
    trainer, summary, _, _ = trained
    assert summary["bad_rows"] == 2
    batch = trainer.extract(_rows(["up:0.25|down:2", "down:1e-3||"]))
    np.testing.assert_array_equal(batch.weights, np.float32([1, 1, 0.25, 2, 1e-3]))  # the users' ids weigh 1
    rows = _rows([f"up:{a}|down:{b}" for a, b in [(0.9, 0.1), (0.1, 0.9), (0.7, 0.2), (0.3, 0.8)]])
    with torch.no_grad():
        trainer.model.eval()
        batch = trainer.extract(rows)
        pooled, _ = trainer.collection.forward(batch, train=False)
        p = torch.sigmoid(trainer.model(pooled, torch.zeros(4, 0)))[:, 0].numpy()
    assert p[0] > 0.8 and p[2] > 0.6 and p[1] < 0.2 and p[3] < 0.4  # learnt from the weights alone


def test_served_scores_equal_the_trained_models_and_a_value_without_weight_is_refused(trained):
    trainer, _, predictor, _ = trained
    rows = _rows(["up:0.9|down:0.1", "down:0.3|up:0.2|up:0.5", ""])
    specs = input_specs(trainer.config)
    assert specs["tags"].weight_separator == ":"
    decoded = decode_request(_request(trainer, rows), None, specs, [*predictor.targets, "score"])
    served = predictor.predict([predictor.piece(decoded.columns, decoded.rows)])
    with torch.no_grad():
        pooled, _ = trainer.collection.forward(trainer.extract(rows), train=False)
        expected = torch.sigmoid(trainer.model(pooled, torch.zeros(3, 0))).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    for value, problem in [("up:0.9|down", "the value 'down' is not an id, ':' and a weight"),
                           ("up:inf", "the value 'up:inf' has a weight that is not a number"),
                           ("up:1e39|down:1", "the value 'up:1e39' has a weight beyond float32's range")]:
        with pytest.raises(RequestError, match=rf"input 'tags', bag 1: {problem}; expected bag values split by "
                                               rf"'\|', each an id, ':' and a weight within float32's range"):
            decode_request(_request(trainer, _rows(["up:1|down:2", value])), None, specs, ["score"])


def test_flat_weighted_values_beside_lengths_are_checked_one_by_one_and_ids_must_be_strings(trained):
    trainer, _, _, bundle = trained
    specs = input_specs(trainer.config)

    def request(values: dict) -> bytes:
        inputs = [{"name": "user", "datatype": "BYTES", "shape": [1], "data": ["u1"]}]
        inputs += [{"name": name, "datatype": kind, "shape": [len(data)], "data": data}
                   for name, (kind, data) in values.items()]
        return json.dumps({"inputs": inputs}).encode()

    flat = {"tags": ("BYTES", ["up:0.9", "down:0.1", "up:0.3"]), "tags.lengths": ("INT32", [2, 1])}
    decoded = decode_request(request(flat), None, specs, ["score"])
    assert decoded.columns["tags"].to_pylist() == ["up:0.9|down:0.1", "up:0.3"]
    flat["tags"] = ("BYTES", ["up:0.9", "down:0.1", "up"])
    with pytest.raises(RequestError, match=r"input 'tags', value 2: the value 'up' is not an id, ':' and a weight; "
                                           r"expected an id, ':' and a weight within float32's range"):
        decode_request(request(flat), None, specs, ["score"])
    flat["tags"] = ("BYTES", ["up:0.9|down", "down:0.1", "up:1"])  # a flat value is one value, not a bag
    with pytest.raises(RequestError, match=r"input 'tags': a value holds the separator '\|'"):
        decode_request(request(flat), None, specs, ["score"])
    with pytest.raises(RequestError, match=r"input 'tags': weighted bags come as BYTES strings 'id:weight', got int64"):
        decode_request(request({"tags": ("INT64", [5, 6])}), None, specs, ["score"])
    service = Service(bundle)
    try:
        inputs = {i["name"]: i for i in service.metadata()["inputs"]}
    finally:
        service.close()
    assert inputs["tags"]["parameters"] == {"side": "item", "separator": "|", "weight_separator": ":"}
    assert inputs["user"]["parameters"] == {"side": "user"}


@pytest.mark.parametrize("other", [
    {"kind": "sparse", "name": "raw_tags", "columns": ["tags"], "table": "ids", "separator": "|"},
    {"kind": "dense", "name": "raw_tags", "column": "tags"},
])
def test_a_weighted_column_is_read_only_as_weighted_bags_with_its_separators(tmp_path, other):
    config = _config(tmp_path).model_dump()
    config["features"].append(other)
    with pytest.raises(ConfigError, match=r"column 'tags' holds weighted bags for feature 'tags' \(separator '\|', "
                                          r"weight_separator ':'\), but \['raw_tags'\] read it another way"):
        Trainer(RunConfig(**config))


def test_inputs_that_overflow_the_network_get_a_400_naming_the_candidates_not_a_500_or_nan_scores(trained):
    """A weight within float32's range passes the checks, but a few of them overflow the
    pooled sum: the binary path answered a 200 with NaN scores, the JSON one a 500."""
    trainer, _, _, bundle = trained
    service = Service(bundle)
    try:
        huge = "|".join(["up:3e38"] * 4)
        with pytest.raises(RequestError, match=r"the model's outputs are not numbers for 2 of the candidates \(1, 3\): "
                                               r"their inputs overflow its arithmetic .*; nothing was scored"):
            asyncio.run(service.infer(_request(trainer, _rows(["up:1|down:2", huge, "up:0.5", huge])), None))
        body, _ = asyncio.run(service.infer(_request(trainer, _rows(["up:1|down:2"])), None))  # and it goes on
        assert json.loads(body)["outputs"][0]["data"][0] > 0.0
    finally:
        service.close()


def test_an_evaluated_row_whose_outputs_overflow_is_a_bad_row_not_a_diverged_training(trained, tmp_path):
    """Up to data.max_bad_fraction of them (10%); more, and training most likely diverged."""
    trainer = trained[0]
    huge = "|".join(["up:3e38"] * 4)
    rows = [f"{i % 2},u{i},up:0.{i}|down:0.{9 - i % 9}" for i in range(19)]
    path = tmp_path / "eval.csv"
    path.write_text("label,user,tags\n" + "\n".join(rows[:3] + [f"0,u2,{huge}"] + rows[3:]) + "\n")
    evaluation = trainer.evaluate(str(path))
    assert evaluation.rows == 19 and evaluation.bad_rows == 1 and evaluation.auc["click"] is not None
    assert evaluation.bad_row_examples == ["valid row 3 of the evaluation (from 0, in the files' order, bad rows left "
                                           "out): the model's outputs are not numbers; its inputs overflow the network "
                                           "(a weighted bag's weight or a dense number too large, say)"]
    path.write_text("label,user,tags\n" + "\n".join(rows[:3] + [f"0,u2,{huge}"] * 3) + "\n")
    with pytest.raises(DataError, match=r"not numbers for 3 of the 6 rows evaluated \(50.0%, more than "
                                        r"data.max_bad_fraction allows\): training most likely diverged"):
        trainer.evaluate(str(path))


@pytest.mark.parametrize("runtime, row", [(None, 4), ({"dense_workers": 2}, 200)], ids=["reference", "engine"])
def test_a_training_row_whose_outputs_overflow_stops_the_run_naming_it_in_its_batch(tmp_path, runtime, row):
    """Before any table row takes the step (the reference trainer: any weight); it said
    only to lower the learning rate, and the engine named no row. Row 200 lies in the
    second dense worker's slice."""
    config = RunConfig(**{**_config(tmp_path).model_dump(), "runtime": runtime})
    rows = (tmp_path / "train.csv").read_text().splitlines()
    rows.insert(row + 1, "1,u3," + "|".join(["up:3e38"] * 1000))  # in the first batch (after the header): its sum is inf
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    trainer = Trainer(config)
    with pytest.raises(TidalError, match=rf"training diverged at step 1: its loss is nan; 1 of the batch's 256 rows have "
                                         rf"outputs that are not numbers \(rows {row}, from 0\): if it is only those, "
                                         rf"their inputs overflow the network"):
        trainer.fit()
    if runtime is None:
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
