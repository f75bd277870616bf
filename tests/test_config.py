"""Config models: valid defaults, and errors that name the field, the value and the range."""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from tidal.config import Adam, CountAdmission, Eviction, Initializer, ProbabilityAdmission, RunConfig, TableConfig
from tidal.errors import ConfigError


def test_defaults_are_valid_and_frozen():
    config = TableConfig(name="user", dim=16)
    assert config.optimizer.kind == "sgd" and config.num_shards == 8
    with pytest.raises(ConfigError, match=r"TableConfig is frozen, so dim cannot be set; make a changed copy"):
        config.dim = 3  # type: ignore[misc]
    assert TableConfig(**{**config.model_dump(), "dim": 32}).dim == 32  # the copy the message suggests


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dim": 0}, "TableConfig 'user': dim: Input should be greater than 0, got 0"),
        ({"num_shards": 3}, "num_shards: Input should be 1, 2, 4, 8, 16, 32 or 64, got 3"),
        ({"optimizer": {"kind": "adam", "beta1": 1.5}}, "optimizer.beta1: Input should be less than 1, got 1.5"),
        ({"optimizer": {"kind": "nadam"}},
         "optimizer: unknown kind 'nadam'; did you mean 'adam'? allowed: 'sgd', 'adagrad'"),
        ({"eviction": {"ttl_steps": 0}}, "eviction.ttl_steps: Input should be greater than 0, got 0"),
        ({"admission": {"kind": "probability", "probability": 2}}, "probability: Input should be less than or equal to 1, got 2"),
        ({"max_rows": -5}, "max_rows: Input should be greater than 0, got -5"),
        ({"max_rows": 2**66}, "max_rows: Input should be less than"),  # was a raw OverflowError as the table was built
        ({"memory_bytes": 2**80}, "memory_bytes: Input should be less than"),
        ({"num_shards": True}, "num_shards: expected a number, got the boolean True"),
        ({"optimizer": {"kind": "adagrad", "eps": 1e-46}},  # 0 in float32: a ZeroDivisionError mid-update
         "optimizer.eps: Input should be greater than or equal to 1.401298464324817e-45, got 1e-46"),
        ({"optimizer": {"kind": "sgd", "lr": 1e39}},  # inf in float32: rows of NaN
         "optimizer.lr: Input should be less than or equal to 3.4028234663852886e+38, got 1e+39"),
        ({"optimizer": {"kind": "adagrad", "initial_accumulator_value": 1e300}},
         "optimizer.initial_accumulator_value: Input should be less than or equal to 3.40"),
        ({"optimizer": {"kind": "ftrl", "l2": 1e300}}, "optimizer.l2: Input should be less than or equal to 3.40"),
        ({"initializer": {"kind": "xavier"}}, "initializer.kind: Input should be 'uniform', 'normal' or 'zeros', got 'xavier'"),
        ({"colour": "red"}, "TableConfig 'user': unknown key 'colour'; allowed: admission, dim, eviction,"),
    ],
)
def test_invalid_table_config_names_field_value_and_range(values, message):
    with pytest.raises(ConfigError) as info:
        TableConfig(**{"name": "user", "dim": 8, **values})
    assert message in str(info.value)


@pytest.mark.parametrize("name", [".", "..", "manifest.json", "manifest.json.partial"])
def test_table_names_that_clash_with_the_checkpoint_layout_are_refused(name):
    with pytest.raises(ConfigError) as info:
        TableConfig(name=name, dim=4)
    assert f"TableConfig {name!r}: name: {name!r} is reserved by the checkpoint layout" in str(info.value)
    assert "'.', '..', 'manifest.json', 'manifest.json.partial'" in str(info.value)
    assert TableConfig(name=f"{name.strip('.')}x.json", dim=4).dim == 4  # only the names themselves


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        TableConfig(name="t", dim=-1, max_rows=0)
    assert "dim:" in str(info.value) and "max_rows:" in str(info.value)


def test_nested_models_validate_on_their_own():
    with pytest.raises(ConfigError, match="Adam: lr: Input should be greater than 0, got 0"):
        Adam(lr=0)
    with pytest.raises(ConfigError, match="min_count: Input should be greater than or equal to 1"):
        CountAdmission(min_count=0)
    with pytest.raises(ConfigError, match="scale: Input should be greater than or equal to 0"):
        Initializer(scale=-1)
    assert Eviction(ttl_steps=5).capacity_policy == "lru"
    assert ProbabilityAdmission(probability=0.5).kind == "probability"


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        TableConfig(name="", dim=4)


def _run(**changes) -> dict:
    run = {"data": {"train": ["train.tsv"]},
           "features": [{"kind": "sparse", "name": "user", "columns": ["C1"], "table": "ids"},
                        {"kind": "label", "name": "click", "column": "label"}],
           "tables": [{"name": "ids", "dim": 8}]}
    return run | changes


@pytest.mark.parametrize(("changes", "message"), [
    ({"features": [{"kind": "sparse", "name": "user", "columns": ["C1"], "table": "ids"}]}, "at least one label"),
    ({"features": [{"kind": "label", "name": "click", "column": "label"}]}, "at least one sparse feature"),
    ({"features": [{"kind": "sparse", "name": "user", "columns": ["C1"], "table": "items"},
                   {"kind": "label", "name": "click", "column": "label"}]}, "uses table 'items', which is not defined"),
    ({"features": [{"kind": "sparse", "name": "n", "columns": ["I1"], "table": "ids", "buckets": [10, 1]},
                   {"kind": "label", "name": "click", "column": "label"}]}, "buckets must be ascending"),
    ({"features": [{"kind": "sparse", "name": "n", "columns": ["I1"], "table": "ids", "buckets": [1, 1, 2]},
                   {"kind": "label", "name": "click", "column": "label"}]}, "buckets must be ascending, each boundary once"),
    ({"features": [{"kind": "sparse", "name": "x", "columns": ["C1", "C1"], "table": "ids"},
                   {"kind": "label", "name": "click", "column": "label"}]}, "a cross takes distinct columns, got ['C1', 'C1']"),
    ({"features": [{"kind": "sparse", "name": "x", "columns": ["C1"], "table": "ids", "hashed": False, "namespace": "u"},
                   {"kind": "label", "name": "click", "column": "label"}]}, "with hashed=false the ids are read as they are"),
    ({"serving": {"fusion": {"weights": {"ltv": 1.0}}}}, "serving.fusion.weights names ['ltv'], which are not targets"),
    ({"features": [{"kind": "sparse", "name": "user", "columns": ["C1"], "table": "ids"},
                   {"kind": "sparse", "name": "user", "columns": ["C2"], "table": "ids"},
                   {"kind": "label", "name": "click", "column": "label"}]}, "feature names must be distinct, got ['user']"),
    ({"tables": [{"name": "ids", "dim": 8}, {"name": "ids", "dim": 8}]}, "table names must be distinct, got ['ids']"),
    ({"tables": [{"name": "ids", "dim": 8}, {"name": "more", "dim": 16}]},
     "every table must have the same dim (pooled embeddings are [B, F, D]), got {'ids': 8, 'more': 16}"),
    ({"data": {"train": []}}, "data.train"),
    ({"data": {"train": "x.tsv", "columns": ["label", "C1", "label"]}}, "data.columns names ['label'] more than once"),
    ({"training": {"run_dir": ""}}, "training.run_dir"),
    ({"training": {"seed": -1}}, "training.seed"),
    ({"training": {"seed": 2**64}}, "training.seed"),
    ({"model": {"kind": "deepfm", "bottom_sizes": [7], "cross_layers": 9, "experts": 9}},
     "RunConfig: model: bottom_sizes (it needs kind: dlrm), cross_layers (it needs kind: dcn), experts (it needs "
     "head: mmoe) would have no effect here: remove them, or set what they need"),
    ({"runtime": {"max_inflight": 64, "ray_address": "auto", "embedding_shards": 5, "loss_scale": 7}},
     "runtime: ray_address (it needs backend: ray), embedding_shards (it needs backend: ray), max_inflight (it needs "
     "mode: async), loss_scale (it needs transfer_dtype: float16) would have no effect here"),
    ({"training": {"eval_every": 2}}, "RunConfig: training.eval_every is 2, but data.eval names no files to evaluate on"),
    ({"tables": [{"name": "ids", "dim": 8, "initializer": {"kind": "zeros", "scale": 0.5}}]},
     "tables.0.initializer: scale (it needs kind: uniform or normal) would have no effect here"),
    ({"tables": [{"name": "ids", "dim": 8, "eviction": {"capacity_policy": "lfu"}}]},
     "tables.0 (ids): eviction.capacity_policy (it needs max_rows or memory_bytes) would have no effect here"),
    ({"tables": [{"name": "ids", "dim": 8}, {"name": "spare", "dim": 8}]},
     "tables ['spare'] are read by no sparse feature: remove them, or name them in a feature's table"),
    ({"features": [{"kind": "sparse", "name": "user", "columns": ["C1"], "table": "ids"},
                   {"kind": "label", "name": "click", "column": "label", "weight": 5}]},
     "label 'click': weight 5 would have no effect (a weight is a target's share of the loss, and this is the only"),
    ({"training": {"evict_every": 7}},
     "training.evict_every (7) would have no effect: no table has an eviction or admission policy; remove it"),
    ({"features": [{"kind": "sparse", "name": "user", "columns": ["C1"], "table": "ids"},
                   {"kind": "label", "name": "score", "column": "label"}]}, "a label may not be named 'score'"),
    ({"features": [{"kind": "sparse", "name": "user", "columns": ["C1"], "table": "ids"},
                   {"kind": "label", "name": "click", "column": "label"},
                   {"kind": "label", "name": "click_label", "column": "I1"}]},
     "labels 'click' and 'click_label': a predictions file holds target 'click''s label as column 'click_label', the "
     "other target's probability; rename one of them"),
    ({"features": [{"kind": "sparse", "name": "user", "columns": ["C1", "C2"], "table": "ids", "pooling": "mean"},
                   {"kind": "label", "name": "click", "column": "label"}]},
     "features.0 (user): pooling (it needs a separator: a bag of several ids a row; one id pools alike every way) "
     "would have no effect here"),
    ({"tables": [{"name": "ids", "dim": 8, "eviction": {}}]}, "tables.0 (ids): eviction would evict nothing: give it "
                                                               "ttl_steps, or give the table max_rows or memory_bytes"),
    ({"tables": [{"name": "ids", "dim": 8, "admission": {"kind": "count", "min_count": 1}}]},
     "tables.0 (ids): admission with min_count 1 admits every key on first sight, as no admission does"),
    ({"tables": [{"name": "ids", "dim": 8, "admission": {"kind": "probability", "probability": 1.0}}]},
     "admission with probability 1.0 admits every key on first sight, as no admission does: remove it"),
    ({"runtime": {"backend": "ray", "embedding_shards": 2}},
     "runtime.embedding_shards is 2, but tables go to shard actors whole and there are 1: give at most 1"),
    ({"training": {"lr_schedule": {"warmup_steps": 1, "tables": True}}},
     "a schedule of warmup_steps 1 and no decay keeps training.lr at every step"),
    ({"features": [{"kind": "sparse", "name": "user", "columns": ["C1"], "table": "ids"},
                   {"kind": "dense", "name": "leak", "column": "label"},
                   {"kind": "label", "name": "click", "column": "label"}]},
     "feature 'leak' reads column 'label', which label 'click' reads: a model given its target as an input learns"),
    ({"features": [{"kind": "sparse", "name": "user", "columns": ["C1", "buy"], "table": "ids"},
                   {"kind": "label", "name": "click", "column": "label"}, {"kind": "label", "name": "buy", "column": "buy"}]},
     "feature 'user' reads column 'buy', which label 'buy' reads"),
    ({"features": [{"kind": "sparse", "name": "hist", "columns": ["hist"], "table": "ids", "separator": "|"},
                   {"kind": "dense", "name": "hl", "column": "hist.lengths"},
                   {"kind": "label", "name": "click", "column": "label"}]},
     "feature 'hl' reads column 'hist.lengths', the name of the served input that may carry bag column 'hist''s "
     "lengths; rename the column"),
    ({"features": [{"kind": "sparse", "name": "user", "columns": ["C1"], "table": "ids"},
                   {"kind": "dense", "name": "price", "column": "I1", "missing_value": 1e39},
                   {"kind": "label", "name": "click", "column": "label"}]},
     "features.1.missing_value: Input should be less than or equal to 3.4028234663852886e+38, got 1e+39"),
    ({"features": [{"kind": "sparse", "name": "user", "columns": ["C1"], "table": "ids"},
                   {"kind": "label", "name": "click", "column": "label", "weight": 1e-320},
                   {"kind": "label", "name": "buy", "column": "buy"}]},
     "weight: Input should be greater than or equal to 1e-30, got 1e-320"),
    ({"tables": [{"name": "ids", "dim": 8, "initializer": {"kind": "normal", "scale": 1e39}}]},
     "scale: Input should be less than or equal to 3.4028234663852886e+38, got 1e+39"),
    ({"data": {"train": "x.tsv", "max_bad_fraction": True}},
     "data.max_bad_fraction: expected a number, got the boolean True"),
])
def test_an_inconsistent_run_config_says_what_is_wrong(changes, message):
    with pytest.raises(ConfigError) as info:
        RunConfig(**_run(**changes))
    assert message in str(info.value)
    RunConfig(**_run())  # the unchanged config is valid


def test_fields_that_apply_are_taken_and_a_saved_config_loads_again():
    two_tables = _run(tables=[{"name": "ids", "dim": 8}, {"name": "more", "dim": 8}])
    two_tables["features"].insert(1, {"kind": "sparse", "name": "item", "columns": ["C2"], "table": "more"})
    applying = RunConfig(**two_tables, model={"kind": "dcn", "cross_layers": 3, "head": "mmoe", "experts": 2},
                         runtime={"backend": "ray", "mode": "async", "max_inflight": 8, "embedding_shards": 2,
                                  "transfer_dtype": "float16", "loss_scale": 64})
    assert applying.model.cross_layers == 3 and applying.runtime.loss_scale == 64
    for config in (applying, RunConfig(**_run())):  # every field dumped, defaults included
        assert RunConfig(**config.model_dump(mode="json")) == config


def test_a_yaml_file_naming_a_key_twice_or_not_utf8_is_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("data: {train: x.tsv}\ntraining: {run_dir: a}\ntraining: {lr: 0.5}\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: not valid YAML at line 3, column 1: the key 'training' appears "
                                          r"twice in one mapping$"):
        RunConfig.from_yaml(str(twice))
    unclosed = tmp_path / "unclosed.yaml"
    unclosed.write_text("training:\n  steps: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"unclosed\.yaml: not valid YAML at line 3, column 6: expected ',' or '\]', but "
                                          r"got ':' \(while parsing a flow sequence at line 2\)$"):  # one line, not 7
        RunConfig.from_yaml(str(unclosed))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"data: {train: caf\xe9.tsv}\n")
    with pytest.raises(ConfigError, match="latin.yaml: not UTF-8 text"):
        RunConfig.from_yaml(str(latin))


def test_a_yaml_key_read_as_no_name_is_refused_naming_where(tmp_path):
    """YAML reads an unquoted on, yes, null or 1 as a boolean, null or number: pydantic
    then failed with a bare TypeError. Steps as keys (sparse_workers_at) stay numbers."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run()) + "model: {kind: dlrm, on: true}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: model: the key True is not a name \(YAML reads an unquoted on, "
                                          r"off, yes, no, null or number as bool\); quote it, or remove it"):
        RunConfig.from_yaml(str(path))
    path.write_text(yaml.safe_dump(_run()))
    with pytest.raises(ConfigError, match=r"with --set 'tables.ids=\{1: 2\}': tables.0: the key 1 is not a name"):
        RunConfig.from_yaml(str(path), ["tables.ids={1: 2}"])
    steps = RunConfig.from_yaml(str(path), ["runtime={backend: ray, sparse_workers_at: {10: 2}}"])
    assert steps.runtime.sparse_workers_at == {10: 2}


def test_yaml_merge_keys_share_settings_between_tables(tmp_path):
    path = tmp_path / "run.yaml"
    run = _run()
    run["features"].insert(1, {"kind": "sparse", "name": "item", "columns": ["C2"], "table": "more"})
    text = yaml.safe_dump({k: v for k, v in run.items() if k != "tables"})
    path.write_text(text + "tables:\n  - &shared {name: ids, dim: 8, optimizer: adagrad}\n  - {<<: *shared, name: more}\n")
    tables = RunConfig.from_yaml(str(path)).tables
    assert [(t.name, t.dim, t.optimizer.kind) for t in tables] == [("ids", 8, "adagrad"), ("more", 8, "adagrad")]


def test_error_paths_are_the_keys_of_the_config_not_pydantics_union_branches():
    run = _run(data={"train": ["a.tsv", 5]}, tables=[{"name": "ids", "dim": 8, "optimizer": {"kind": "adagrad", "lr": -1}}])
    run["features"][0]["pooling"] = "max"
    with pytest.raises(ConfigError) as info:
        RunConfig(**run)
    lines = str(info.value).splitlines()
    assert "RunConfig: data.train: expected a file, a glob, or a non-empty list of them (strings), got ['a.tsv', 5]" \
        in lines
    for data, shown in [({"train": ""}, "data.train: expected a file, a glob, or a non-empty list of them, got an "
                                          "empty name ''"),
                        ({"train": "a.tsv", "eval": ""}, "data.eval: expected a file, a glob, or a non-empty list of "
                                                          "them, got an empty name '' (for no evaluation, leave "
                                                          "data.eval out or set it to null)"),
                        ({"train": ["a.tsv", " "]}, "got an empty name ['a.tsv', ' ']")]:
        with pytest.raises(ConfigError, match=re.escape(shown)):  # an unset variable templated in: not "no files"
            RunConfig(**_run(data=data))
    saved = RunConfig(**_run(data={"train": "a.tsv"})).model_dump(mode="json")
    saved["data"]["eval"] = ""  # as a config saved before empty names were refused says "no evaluation"
    assert RunConfig.from_saved(saved).data.eval is None
    assert "RunConfig: features.0.pooling: Input should be 'sum', 'mean' or 'sqrtn', got 'max'" in lines
    assert "RunConfig: tables.0.optimizer.lr: Input should be greater than 0, got -1" in lines
    with pytest.raises(ConfigError, match=r"^RunConfig: tables\.0: required key 'name' is missing$"):
        RunConfig(**_run(tables=[{"dim": 8}]))
    # a key named as the branch its kind picks: said once
    admitting = {"name": "ids", "dim": 8, "admission": {"kind": "probability", "probability": 2}}
    with pytest.raises(ConfigError, match=r"^RunConfig: tables\.0\.admission\.probability: Input should be less "
                                          r"than or equal to 1, got 2$"):
        RunConfig(**_run(tables=[admitting]))


def test_unknown_key_message_suggests_the_closest_key_and_lists_the_allowed_ones():
    run = _run()
    run["features"][0]["seperator"] = "|"
    with pytest.raises(ConfigError) as info:
        RunConfig(**run)
    assert str(info.value) == ("RunConfig: features.0 (user): unknown key 'seperator'; did you mean 'separator'? "
                               "allowed: buckets, columns, hashed, kind, missing, name, namespace, pooling, separator, "
                               "side, table, weight_separator")


@pytest.mark.parametrize(("changes", "message"), [
    ({"trainign": {}}, "RunConfig: unknown key 'trainign'; did you mean 'training'? allowed: data, features, model,"),
    ({"training": {"lrr": 0.1}},
     "RunConfig: training: unknown key 'lrr'; did you mean 'lr'? allowed: checkpoint_every,"),
    ({"serving": {"fusion": {"zzz": 1}}}, "RunConfig: serving.fusion: unknown key 'zzz'; allowed: kind, weights"),
])
def test_unknown_key_message_names_the_place_that_holds_it_at_any_depth(changes, message):
    with pytest.raises(ConfigError) as info:
        RunConfig(**_run(**changes))
    assert str(info.value).startswith(message)


def test_missing_key_message_names_the_key_without_the_whole_config():
    run = _run()
    del run["tables"]
    with pytest.raises(ConfigError) as info:
        RunConfig(**run)
    assert str(info.value) == "RunConfig: required key 'tables' is missing"


@pytest.mark.parametrize(("where", "kind", "message"), [
    ("feature", "spares", "RunConfig: features.0 (user): unknown kind 'spares'; did you mean 'sparse'? "
                          "allowed: 'sparse', 'dense', 'label'"),
    ("optimizer", "adagard", "RunConfig: tables.0.optimizer: unknown kind 'adagard'; did you mean 'adagrad'? "
                             "allowed: 'sgd', 'adagrad', 'rowwise_adagrad', 'adam', 'adamw', 'ftrl'"),
    ("feature", None, "RunConfig: features.0 (user): required key 'kind' is missing; "
                      "allowed: 'sparse', 'dense', 'label'"),
])
def test_unknown_kind_message_suggests_the_closest_kind(where, kind, message):
    run = _run()
    target = run["features"][0] if where == "feature" else run["tables"][0].setdefault("optimizer", {})
    target.pop("kind", None)
    if kind is not None:
        target["kind"] = kind
    with pytest.raises(ConfigError) as info:
        RunConfig(**run)
    assert str(info.value) == message


def test_a_boolean_where_a_number_goes_is_refused_not_read_as_one(tmp_path):
    with pytest.raises(ConfigError, match="TableConfig 't': dim: expected a number, got the boolean True"):
        TableConfig(name="t", dim=True)
    with pytest.raises(ConfigError, match="TableConfig 't': dim: expected a number, got the boolean True"):
        TableConfig(name="t", dim=np.bool_(True))
    with pytest.raises(ConfigError, match="eviction.ttl_steps: expected a number, got the boolean False"):
        TableConfig(name="t", dim=8, eviction={"ttl_steps": False})
    config = tmp_path / "run.yaml"
    config.write_text("data: {train: x.tsv, batch_size: true}\nfeatures: [{kind: sparse, name: u, columns: [C1], table: ids},"
                      " {kind: label, name: click, column: label}]\ntables: [{name: ids, dim: 8, optimizer: {kind: sgd, lr: 1e-3}}]\n")
    with pytest.raises(ConfigError, match="data.batch_size: expected a number, got the boolean True"):
        RunConfig.from_yaml(str(config))
    config.write_text(config.read_text().replace("batch_size: true", "batch_size: 64"))
    loaded = RunConfig.from_yaml(str(config))
    assert loaded.data.batch_size == 64 and loaded.tables[0].optimizer.lr == 1e-3
    assert Adam(per_row_bias_correction=True).per_row_bias_correction


def test_numbers_with_an_exponent_are_numbers_whole_ones_where_an_integer_goes(tmp_path):
    config = tmp_path / "run.yaml"  # YAML 1.1 reads 1e3 and 1e-3 as strings: 1e3 was refused for an integer
    config.write_text("data: {train: x.tsv, batch_size: 1e3}\nfeatures: [{kind: sparse, name: u, columns: [C1], "
                      "table: ids}, {kind: label, name: click, column: label}]\n"
                      "tables: [{name: ids, dim: 8, reserve_rows: 2.5E+6, optimizer: {kind: sgd, lr: 5e-3}}]\n")
    loaded = RunConfig.from_yaml(str(config))
    assert loaded.data.batch_size == 1000 and isinstance(loaded.data.batch_size, int)
    assert loaded.tables[0].reserve_rows == 2_500_000 and loaded.tables[0].optimizer.lr == 5e-3
    config.write_text(config.read_text().replace("batch_size: 1e3", "batch_size: 1e-3"))
    with pytest.raises(ConfigError, match="data.batch_size: .*fractional part.*got 0.001"):
        RunConfig.from_yaml(str(config))


@pytest.mark.parametrize(("text", "got"), [("", "nothing (the file is empty, or comments only)"),
                                           ("# to do\n", "nothing (the file is empty, or comments only)"),
                                           ("[1, 2]\n", "list")])
def test_a_config_file_that_holds_no_mapping_says_what_it_holds(tmp_path, text, got):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=rf"run\.yaml: expected a mapping with data, features, tables, model, "
                                          rf"training; got {re.escape(got)}$"):
        RunConfig.from_yaml(str(config))


@pytest.mark.parametrize(("section", "text", "line", "written"), [
    ("runtime", "runtime:\n", 4, "runtime: {}\n"),
    ("passmode", "passmode:  # comment\n", 4, "passmode: {}\n"),
    ("eviction", "tables:\n  - name: ids\n    dim: 8\n    eviction:\n    #  capacity_policy: lfu\n", 6,
     "tables:\n  - name: ids\n    dim: 8\n    eviction: {ttl_steps: 10}\n"),
    ("lr_schedule", "training:\n  lr_schedule:\n", 5, "training:\n  lr_schedule: {warmup_steps: 10}\n"),
])
def test_a_yaml_section_with_nothing_under_it_is_refused_not_read_as_absent(tmp_path, section, text, line, written):
    config = tmp_path / "run.yaml"
    head = "data: {train: x.tsv}\nfeatures: [{kind: sparse, name: u, columns: [C1], table: ids}, " \
           "{kind: label, name: click, column: label}]\n"
    tables = "" if section == "eviction" else "tables: [{name: ids, dim: 8}]\n"
    config.write_text(head + tables + text)
    defaults = r" \(\{\} for the defaults\)" if section in ("runtime", "passmode") else ""
    with pytest.raises(ConfigError, match=rf"run\.yaml: line {line}: {section}: has no value; give its settings"
                                          rf"{defaults}, or remove it \(or write {section}: null\)"):
        RunConfig.from_yaml(str(config))
    for body, present in ((written, True), (text.replace(f"{section}:", f"{section}: null", 1), False)):
        config.write_text(head + tables + body)
        loaded = RunConfig.from_yaml(str(config))
        owner = {"eviction": loaded.tables[0], "lr_schedule": loaded.training}.get(section, loaded)
        assert (getattr(owner, section) is not None) == present


@pytest.mark.parametrize(("text", "line", "expected"), [
    ("serving:\n", 4, "serving: has no value; give its settings, or remove it for the defaults"),
    ("training:\n  optimizer:\n  lr: 0.1\n", 5, "optimizer: has no value; give its settings, or remove it for the "
                                                 "defaults"),
    ("model:  # DLRM\n", 4, "model: has no value; give its settings, or remove it for the defaults"),
])
def test_a_blank_section_with_default_settings_is_refused_by_line(tmp_path, text, line, expected):
    config = tmp_path / "run.yaml"
    config.write_text("data: {train: x.tsv}\nfeatures: [{kind: sparse, name: u, columns: [C1], table: ids}, "
                      "{kind: label, name: click, column: label}]\ntables: [{name: ids, dim: 8}]\n" + text)
    with pytest.raises(ConfigError, match=rf"run\.yaml: line {line}: {re.escape(expected)}$"):
        RunConfig.from_yaml(str(config))
    config.write_text(config.read_text().replace("data: {train: x.tsv}", "data:"))
    with pytest.raises(ConfigError, match=r"run\.yaml: line 1: data: has no value; give its settings$"):
        RunConfig.from_yaml(str(config))


def test_a_key_of_another_section_is_said_to_belong_there(tmp_path):
    base = {"data": {"train": "x.tsv"}, "tables": [{"name": "ids", "dim": 8}],
            "features": [{"kind": "sparse", "name": "u", "columns": ["C1"], "table": "ids"},
                         {"kind": "label", "name": "click", "column": "label"}]}
    with pytest.raises(ConfigError, match=r"^RunConfig: training: unknown key 'eval_group_by'; it belongs under data "
                                          r"\(data.eval_group_by\)$"):
        RunConfig(**base, training={"eval_group_by": "u"})
    with pytest.raises(ConfigError, match=r"data: unknown key 'epochs'; it belongs under training \(training.epochs\)"):
        RunConfig(**{**base, "data": {"train": "x.tsv", "epochs": 2}})
    with pytest.raises(ConfigError, match=r"passmode: unknown key 'device'; allowed: "):  # training's and runtime's
        RunConfig(**base, passmode={"device": "cpu"})


def test_set_overrides_replace_values_of_the_file_by_key_path_naming_list_elements_by_name_or_index(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: {train: x.tsv, batch_size: 64}\nfeatures: [{kind: sparse, name: u, columns: [C1], "
                      "table: ids}, {kind: label, name: click, column: label}]\n"
                      "tables: [{name: ids, dim: 8, optimizer: {kind: sgd, lr: 5e-3}}]\n")
    loaded = RunConfig.from_yaml(str(config), ["training.lr=2e-2", "tables.ids.dim=16", "features.0.columns=[C2, C3]",
                                               "tables.0.optimizer={kind: adagrad}", "runtime.mode=sync"])
    assert loaded.training.lr == 0.02 and loaded.tables[0].dim == 16 and loaded.features[0].columns == ["C2", "C3"]
    assert loaded.tables[0].optimizer.kind == "adagrad" and loaded.runtime.mode == "sync"  # a section made on the way
    assert RunConfig.from_yaml(str(config)).tables[0].dim == 8  # the file itself unchanged
    shared = tmp_path / "shared.yaml"  # two tables of one optimizer, by a YAML alias
    shared.write_text("data: {train: x.tsv}\nfeatures: [{kind: sparse, name: u, columns: [C1], table: a}, {kind: sparse, "
                      "name: i, columns: [C2], table: b}, {kind: label, name: click, column: label}]\n"
                      "tables: [{name: a, dim: 8, optimizer: &opt {kind: sgd, lr: 0.1}}, {name: b, dim: 8, "
                      "optimizer: *opt}]\n")
    tables = RunConfig.from_yaml(str(shared), ["tables.a.optimizer.lr=0.5"]).tables
    assert (tables[0].optimizer.lr, tables[1].optimizer.lr) == (0.5, 0.1)  # the one named, not the alias's other
    bomb = "\n".join(f"b{k}: &b{k} [{', '.join([f'*b{k - 1}'] * 10)}]" for k in range(1, 9))
    shared.write_text(shared.read_text() + "a: &b0 x\n" + bomb + "\n")  # 10^8 values, as aliases of aliases
    with pytest.raises(ConfigError, match="more than 1,000,000 values once its YAML aliases are expanded"):
        RunConfig.from_yaml(str(shared), ["training.lr=0.5"])
    dotted = tmp_path / "dotted.yaml"  # a table name may hold dots: the longest name the key spells is the one
    dotted.write_text(config.read_text().replace("table: ids", "table: u.v").replace("name: ids", "name: u.v"))
    assert RunConfig.from_yaml(str(dotted), ["tables.u.v.dim=4"]).tables[0].dim == 4
    both = tmp_path / "both.yaml"  # a key that spells two names is refused, not guessed
    both.write_text(dotted.read_text().replace("tables: [", "tables: [{name: u, dim: 2}, "))
    with pytest.raises(ConfigError, match=re.escape("--set tables.u.v.dim: tables has elements named 'u' and 'u.v', "
                                                    "so the key could mean either; name the element by its index")):
        RunConfig.from_yaml(str(both), ["tables.u.v.dim=4"])
    for entry, message in [
        ("tables.items.dim=16", "--set tables.items.dim: tables has no element named 'items' (its names: ids; or an "
                                "index from 0 to 0)"),
        ("training.lr", "--set takes KEY.PATH=VALUE (training.lr=0.01, tables.items.dim=32), got 'training.lr'"),
        ("training.lr=", "--set takes KEY.PATH=VALUE"),
        ("data.batch_size.x=1", "--set data.batch_size.x: data.batch_size is 64, not a mapping or a list"),
        ("training.lr=[1", "--set training.lr: the value is not YAML"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            RunConfig.from_yaml(str(config), [entry])
    with pytest.raises(ConfigError, match=re.escape(f"{config} with --set training.lrr=1: RunConfig: training: "
                                                    "unknown key 'lrr'")):
        RunConfig.from_yaml(str(config), ["training.lrr=1"])


def test_a_normal_initializer_whose_draws_would_overflow_float32_is_refused():
    assert TableConfig(name="t", dim=4, initializer=Initializer(kind="normal", scale=5e37)).initializer.scale == 5e37
    with pytest.raises(ConfigError, match=r"a normal initializer's scale must be at most 5\.671e\+37, got 3e\+38: its "
                                          r"draws reach 6 times the scale"):
        Initializer(kind="normal", scale=3e38)


@pytest.mark.parametrize("runtime, entry, shown", [
    ({"sparse_workers_at": {5: 1}}, "{5: 1}", "1 sparse worker then already;"),
    ({"sparse_workers": 2, "sparse_workers_at": {13: 3, 20: 3}}, "{20: 3}", "3 sparse workers then already;"),
    ({"sparse_workers": 1, "colocated_sparse_worker": True, "sparse_workers_at": {10: 2}}, "{10: 2}",
     "2 sparse workers then already (the colocated one among them);"),
])
def test_a_sparse_workers_at_entry_that_keeps_the_count_is_refused_as_changing_nothing(runtime, entry, shown):
    from tidal.config import RuntimeConfig

    with pytest.raises(ConfigError, match=rf"sparse_workers_at {re.escape(entry)} changes nothing: the run has "
                                          rf"{re.escape(shown)} give each step a new count, or leave it out"):
        RuntimeConfig(**runtime)
    saved = RunConfig.from_saved({**_run(), "runtime": runtime})  # a run saved before it was refused reads back
    assert saved.runtime.sparse_workers_at == runtime["sparse_workers_at"]
