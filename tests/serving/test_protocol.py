"""Request decoding: every accepted form of an input gives the same columns."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest
from serving_helpers import serving_config

from tidal.serving import RequestError
from tidal.serving.protocol import context_inputs, decode_request, encode_response, input_specs

OUTPUTS = ["ctr", "cvr", "score"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    return input_specs(serving_config(tmp_path_factory.mktemp("protocol")))


def _request(specs, rows: int, **overrides) -> dict:
    """A JSON request of `rows` candidates with simple values; `overrides` replace inputs."""
    inputs = {}
    for spec in specs.values():
        n = 1 if spec.side != "item" else rows
        values = [str(k + 1) for k in range(n)] if spec.kind == "number" else [f"v{k}" for k in range(n)]
        inputs[spec.name] = {"name": spec.name, "datatype": "BYTES", "shape": [n], "data": values}
    inputs.update(overrides)
    return {"inputs": [t for t in inputs.values() if t is not None]}


def _decode(specs, body: dict, binary: bytes = b"", **parameters):
    header = json.dumps({**body, "parameters": parameters} if parameters else body).encode()
    return decode_request(header + binary, str(len(header)) if binary else None, specs, OUTPUTS)


def test_the_sides_of_the_inputs(specs):
    assert specs["C1"].side == "both" and specs["C2"].side == "user" and specs["C9"].side == "item"
    assert specs["I1"].kind == "number" and specs["C7"].separator == "|" and specs["C9"].kind == "ids"


def test_values_with_lengths_become_the_joined_strings_of_a_file(specs):
    lengths = {"name": "C7.lengths", "datatype": "INT32", "shape": [3], "data": [2, 0, 1]}
    values = {"name": "C7", "datatype": "BYTES", "shape": [3], "data": ["a", "b", "c"]}
    decoded = _decode(specs, _request(specs, 3, C7=values, **{"C7.lengths": lengths}))
    assert decoded.columns["C7"].to_pylist() == ["a|b", "", "c"]
    with pytest.raises(RequestError, match="lengths add up to 2"):
        _decode(specs, _request(specs, 3, C7=values, **{"C7.lengths": {**lengths, "data": [1, 0, 1]}}))
    one_bag = {**lengths, "shape": [1], "data": [3]}  # an audit's find: the count of bags was blamed on C7's values
    with pytest.raises(RequestError, match=r"^input 'C7\.lengths' is an item feature: expected 3 values .*, got 1;"):
        _decode(specs, _request(specs, 3, C7=values, **{"C7.lengths": one_bag}))


def test_int64_ids_hash_as_their_decimal_strings_and_numbers_come_in_any_form(specs):
    decoded = _decode(specs, _request(specs, 2, C9={"name": "C9", "datatype": "INT64", "shape": [2], "data": [7, -3]},
                                      I5={"name": "I5", "datatype": "FP32", "shape": [2, 1], "data": [[1.5], [2.0]]}))
    assert decoded.columns["C9"].to_pylist() == ["7", "-3"]
    assert decoded.columns["I5"].to_pylist() == [1.5, 2.0]
    texts = _decode(specs, _request(specs, 6, I5={"name": "I5", "datatype": "BYTES", "shape": [6],
                                                  "data": ["1.5", "", "NaN", "nan", "-NAN", "+nAn"]}))
    assert texts.columns["I5"].to_pylist() == [1.5] + [None] * 5  # empty or NaN: missing, as in a file


def test_missing_numbers_come_as_null_or_nan_and_values_past_the_type_are_refused(specs):
    json_null = _decode(specs, _request(specs, 3, I5={"name": "I5", "datatype": "FP64", "shape": [3],
                                                      "data": [1.5, None, 2.0]}))
    assert json_null.columns["I5"].to_pylist() == [1.5, None, 2.0]  # missing, as an empty field in a file
    nan = np.array([np.nan, 4.0], "<f4").tobytes()
    body = _request(specs, 2, I5={"name": "I5", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}})
    assert _decode(specs, body, nan).columns["I5"].to_pylist() == [None, 4.0]
    with pytest.raises(RequestError, match="'I5': a value does not fit FP32: 1e\\+308 at position 1"):
        _decode(specs, _request(specs, 2, I5={"name": "I5", "datatype": "FP32", "shape": [2], "data": [1.0, 1e308]}))
    inf = np.array([np.inf, 4.0], "<f4").tobytes()
    with pytest.raises(RequestError, match="'I5': values must be finite and within float32's range .* or NaN "
                                           "\\(missing\\); got inf at position 0"):
        _decode(specs, body, inf)


@pytest.mark.parametrize("datatype, value", [("FP64", 1e39), ("FP64", -3.4028236e38), ("BYTES", "1e39")])
def test_numbers_past_float32_are_refused_as_training_counts_them_bad_rows(specs, datatype, value):
    """Checked before batching: found later, inside a batch, they failed every request of it with a 500."""
    with pytest.raises(RequestError, match=r"'I5': values must be finite and within float32's range \(\|x\| <= "
                                           r"3.4028235e\+38\), as in training's files"):
        _decode(specs, _request(specs, 2, I5={"name": "I5", "datatype": datatype, "shape": [2],
                                              "data": ["1" if datatype == "BYTES" else 1.0, value]}))
    edge = _decode(specs, _request(specs, 2, I5={"name": "I5", "datatype": "FP64", "shape": [2],
                                                 "data": [3.4028235e38, -3.4028235e38]}))
    assert edge.columns["I5"].to_pylist() == [3.4028235e38, -3.4028235e38]  # as a file may hold them


def test_fp32_numbers_are_read_by_their_shortest_decimal_as_a_float32_file_value_is(specs):
    values = np.array([0.7, 0.1, 123456.79], "<f4")
    body = _request(specs, 3, I5={"name": "I5", "datatype": "FP32", "shape": [3], "parameters": {"binary_data_size": 12}})
    assert _decode(specs, body, values.tobytes()).columns["I5"].to_pylist() == [0.7, 0.1, 123456.79]  # not 0.69999998...
    both = _request(specs, 3, I5={"name": "I5", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.0],
                                  "parameters": {"binary_data_size": 12}})
    with pytest.raises(RequestError, match=r"input 'I5' has both data and parameters\.binary_data_size; send its values "
                                           r"one way"):  # was answered from the binary values, the JSON ones dropped
        _decode(specs, both, values.tobytes())
    with pytest.raises(RequestError, match="'C9': INT64 data must be integers"):
        _decode(specs, _request(specs, 2, C9={"name": "C9", "datatype": "INT64", "shape": [2], "data": [1, None]}))


def test_binary_tensors_decode_like_json(specs):
    strings = [b"v0", b"\xc3\xa9t\xc3\xa9"]
    raw = b"".join(len(s).to_bytes(4, "little") + s for s in strings)
    numbers = np.array([3.0, 4.0], "<f4").tobytes()
    body = _request(specs, 2, C9={"name": "C9", "datatype": "BYTES", "shape": [2],
                                  "parameters": {"binary_data_size": len(raw)}},
                    I5={"name": "I5", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}})
    order = [t["name"] for t in body["inputs"] if "parameters" in t]
    decoded = _decode(specs, body, b"".join(raw if name == "C9" else numbers for name in order))
    assert decoded.columns["C9"].to_pylist() == ["v0", "été"] and decoded.columns["I5"].to_pylist() == [3.0, 4.0]


def test_a_one_value_item_input_is_refused_when_the_request_has_more_candidates(specs):
    """Broadcast, a truncated item column scored every candidate with its one value: wrong scores with a 200."""
    one = {"name": "C9", "datatype": "BYTES", "shape": [1], "data": ["x"]}
    with pytest.raises(RequestError, match=r"^input 'C9' is an item feature: expected 4 values \(one per candidate, "
                                           r"as 'C4' has\), got 1; send every item input with one value per "
                                           r"candidate \(only user and context inputs may come once"):
        _decode(specs, _request(specs, 4, C9=one))
    with pytest.raises(RequestError, match=r"^input 'C9' is an item feature: expected 4 values .*, got 3"):
        _decode(specs, _request(specs, 4, C9={**one, "shape": [3], "data": ["x", "y", "z"]}))
    in_a_session = r"^input 'C9' is an item feature: expected 4 values .*, got 1"
    with pytest.raises(RequestError, match=in_a_session):
        _decode(specs, {"inputs": [t for t in _request(specs, 4, C9=one)["inputs"] if specs[t["name"]].side == "item"]},
                sequence_id=3)
    assert _decode(specs, _request(specs, 1, C9=one)).rows == 1  # one candidate: one value is its own


def test_two_item_inputs_of_different_sizes_are_refused_naming_the_short_one(tmp_path):
    specs = input_specs(_sided_config(tmp_path, item=("A", "B")))
    body = {"inputs": [{"name": "A", "datatype": "BYTES", "shape": [1], "data": ["a"]},
                       {"name": "B", "datatype": "BYTES", "shape": [2], "data": ["b", "c"]}]}
    with pytest.raises(RequestError, match=r"^input 'A' is an item feature: expected 2 values \(one per candidate, "
                                           r"as 'B' has\), got 1"):
        _decode(specs, body)


def test_user_and_context_inputs_of_one_value_stand_for_every_candidate(tmp_path):
    config = _sided_config(tmp_path, user=("U",), context=("X",), item=("A",))
    specs, context = input_specs(config), context_inputs(config)
    assert context == {"X"} and specs["X"].side == "item"  # as bundles' manifests have it

    def body(user: int, ctx: int, items: int) -> dict:
        return {"inputs": [{"name": name, "datatype": "BYTES", "shape": [n], "data": [f"{name}{k}" for k in range(n)]}
                           for name, n in (("U", user), ("X", ctx), ("A", items))]}

    once = decode_request(json.dumps(body(1, 1, 3)).encode(), None, specs, OUTPUTS, context=context)
    assert once.rows == 3 and once.columns["U"].to_pylist() == ["U0"] and once.columns["X"].to_pylist() == ["X0"]
    assert decode_request(json.dumps(body(1, 3, 3)).encode(), None, specs, OUTPUTS, context=context).rows == 3
    with pytest.raises(RequestError, match=r"^input 'X' is a context feature: expected 3 values \(one per candidate, "
                                           r"as 'A' has\) or 1 \(the same for every candidate\), got 2"):
        decode_request(json.dumps(body(1, 2, 3)).encode(), None, specs, OUTPUTS, context=context)
    with pytest.raises(RequestError, match=r"^input 'X' is a context feature: expected 1 value \(one per candidate, "
                                           r"as 'A' has\) or 1"):  # the item input sets the count, not the context's
        decode_request(json.dumps(body(1, 3, 1)).encode(), None, specs, OUTPUTS, context=context)
    with pytest.raises(RequestError, match=r"user inputs carry one value per request, got \{'U': 3\}"):
        decode_request(json.dumps(body(3, 1, 3)).encode(), None, specs, OUTPUTS, context=context)
    with pytest.raises(RequestError, match="input 'X' is an item feature"):  # not named a context input: per candidate
        decode_request(json.dumps(body(1, 1, 3)).encode(), None, specs, OUTPUTS)
    without = {"inputs": body(1, 1, 3)["inputs"][2:]}  # as the model's metadata says: X is a context input
    with pytest.raises(RequestError, match=r"^missing inputs \['U', 'X'\]; the model reads U \(user\), X \(context\), "
                                           r"A \(item\)$"):
        decode_request(json.dumps(without).encode(), None, specs, OUTPUTS, context=context)


def test_a_column_split_two_ways_comes_as_the_files_strings_alone(tmp_path):
    """Its input took one of the two separators, by the process's hash seed: the server
    refused its own bundle in half of its starts, and joined values and lengths wrongly."""
    from tidal.config import RunConfig

    config = RunConfig(data={"train": str(tmp_path / "none.tsv")}, tables=[{"name": "t", "dim": 4}],
                       features=[{"kind": "sparse", "name": "a", "columns": ["T"], "table": "t", "separator": "|"},
                                 {"kind": "sparse", "name": "b", "columns": ["T"], "table": "t", "separator": ","},
                                 {"kind": "label", "name": "y", "column": "label"}])
    specs = input_specs(config)
    assert specs["T"].separator is None
    strings = {"name": "T", "datatype": "BYTES", "shape": [2], "data": ["1|2,3", "4"]}
    assert _decode(specs, {"inputs": [strings]}).columns["T"].to_pylist() == ["1|2,3", "4"]
    lengths = [{"name": "T", "datatype": "BYTES", "shape": [2], "data": ["1", "2"]},
               {"name": "T.lengths", "datatype": "INT32", "shape": [1], "data": [2]}]
    with pytest.raises(RequestError, match=r"unknown inputs \['T.lengths'\]"):
        _decode(specs, {"inputs": lengths})


def _sided_config(root, **sides: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """A config of one hashed feature per column, of the side named."""
    from tidal.config import RunConfig

    features = [{"kind": "sparse", "name": column.lower(), "columns": [column], "table": "t", "side": side}
                for side, columns in sides.items() for column in columns]
    return RunConfig(data={"train": str(root / "none.tsv")}, tables=[{"name": "t", "dim": 4}],
                     features=[*features, {"kind": "label", "name": "y", "column": "label"}])


@pytest.mark.parametrize("sequence_id, came", [(None, "none"), (0, "0, which is not a sequence id"),
                                               ("", "'', which is not a sequence id")])
def test_sequence_flags_are_refused_when_no_sequence_id_or_0_comes(specs, sequence_id, came):
    ids = {} if sequence_id is None else {"sequence_id": sequence_id}
    with pytest.raises(RequestError, match=rf"^sequence_start needs a sequence: expected a non-zero sequence_id, "
                                           rf"got {came}"):
        _decode(specs, _request(specs, 2), sequence_start=True, **ids)
    with pytest.raises(RequestError, match=r"^sequence_start and sequence_end need a sequence: .* or leave "
                                           r"sequence_start and sequence_end out"):
        _decode(specs, _request(specs, 2), sequence_start=True, sequence_end=True, **ids)
    assert _decode(specs, _request(specs, 2), **ids).sequence_id is None  # 0 alone: a stateless request, as in Triton


def test_a_start_may_come_without_candidates_and_an_end_without_inputs(specs):
    users_only = {"inputs": [t for t in _request(specs, 1)["inputs"] if specs[t["name"]].side != "item"]}
    start = _decode(specs, users_only, sequence_id="u1", sequence_start=True)
    assert start.rows == 0 and start.sequence_id == "u1"
    with pytest.raises(RequestError, match="missing inputs"):
        _decode(specs, users_only)
    end = _decode(specs, {"inputs": []}, sequence_id="u1", sequence_end=True)  # an end without candidates
    assert end.rows == 0 and end.columns == {} and end.sequence_end
    with pytest.raises(RequestError, match="missing inputs"):
        _decode(specs, {"inputs": []})


def test_binary_outputs_follow_the_header(specs):
    decoded = _decode(specs, {**_request(specs, 2), "outputs": [{"name": "score", "parameters": {"binary_data": True}},
                                                               {"name": "ctr"}]})
    body, headers = encode_response("m", decoded, {"ctr": np.array([0.5, 0.25]), "cvr": np.zeros(2),
                                                   "score": np.array([1.0, 2.0])})
    size = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:size])
    assert [o["name"] for o in header["outputs"]] == ["score", "ctr"] and header["outputs"][1]["data"] == [0.5, 0.25]
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    np.testing.assert_array_equal(np.frombuffer(body[size:], "<f4"), [1.0, 2.0])
    with pytest.raises(RequestError, match=r"unknown outputs \['nope'\]"):
        _decode(specs, {**_request(specs, 1), "outputs": [{"name": "nope"}]})
    with pytest.raises(RequestError, match=r'outputs must be a list of objects with a name, got \["score"\]$'):
        _decode(specs, {**_request(specs, 1), "outputs": ["score"]})
    with pytest.raises(RequestError, match=r"output 'score': parameter binary_data must be true or false, got 'yes'"):
        _decode(specs, {**_request(specs, 1), "outputs": [{"name": "score", "parameters": {"binary_data": "yes"}}]})
    for key in ("class_count", "classification"):  # tritonclient sends the latter
        with pytest.raises(RequestError, match=rf"output 'score': {key} asks for Triton's classification extension"):
            _decode(specs, {**_request(specs, 1), "outputs": [{"name": "score", "parameters": {key: 2}}]})


def test_binary_data_output_makes_every_wanted_output_binary_unless_one_says_otherwise(specs):
    every = _decode(specs, _request(specs, 2), binary_data_output=True)
    assert every.outputs is None and every.binary_outputs == set(OUTPUTS)
    none_named = _decode(specs, {**_request(specs, 2), "outputs": []}, binary_data_output=True)
    assert none_named.outputs is None and none_named.binary_outputs == set(OUTPUTS)
    listed = _decode(specs, {**_request(specs, 2), "outputs": [{"name": "ctr"}]}, binary_data_output=True)
    assert listed.outputs == ["ctr"] and listed.binary_outputs == {"ctr"}
    overridden = _decode(specs, {**_request(specs, 2), "outputs": [
        {"name": "ctr"}, {"name": "score", "parameters": {"binary_data": False}}]}, binary_data_output=True)
    assert overridden.outputs == ["ctr", "score"] and overridden.binary_outputs == {"ctr"}
    with pytest.raises(RequestError, match=r"outputs names \['ctr'\] more than once"):
        _decode(specs, {**_request(specs, 2), "outputs": [{"name": "ctr"}, {"name": "score"}, {"name": "ctr"}]})
    assert _decode(specs, _request(specs, 2)).binary_outputs == set()
    with pytest.raises(RequestError, match=r"\['binary_data_output'\] must be true or false"):
        _decode(specs, _request(specs, 2), binary_data_output="yes")


def test_a_score_that_is_not_a_number_is_never_sent_as_json(specs):
    decoded = _decode(specs, _request(specs, 2))
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_response("m", decoded, {"ctr": np.array([0.5, np.nan]), "cvr": np.zeros(2), "score": np.zeros(2)})


def test_column_arrays_are_arrow(specs):
    decoded = _decode(specs, _request(specs, 3))
    assert all(isinstance(a, pa.Array) for a in decoded.columns.values())


def test_a_column_read_several_ways_is_checked_every_way_and_nulls_read_as_missing(tmp_path):
    from tidal.config import RunConfig

    config = RunConfig(
        data={"train": str(tmp_path / "none.tsv")},
        features=[{"kind": "sparse", "name": "u", "columns": ["U"], "table": "t", "hashed": False},
                  {"kind": "sparse", "name": "u_hashed", "columns": ["U"], "table": "t"},
                  {"kind": "sparse", "name": "x", "columns": ["X"], "table": "t"},
                  {"kind": "dense", "name": "x_count", "column": "X"},
                  {"kind": "label", "name": "y", "column": "label"}],
        tables=[{"name": "t", "dim": 4}])
    specs = input_specs(config)
    assert (specs["U"].kind, specs["U"].also, specs["X"].kind, specs["X"].also) == ("ids", ("integer",), "ids", ("number",))

    def body(u: list, x: list) -> dict:
        return {"inputs": [{"name": "U", "datatype": "BYTES", "shape": [len(u)], "data": u},
                           {"name": "X", "datatype": "BYTES", "shape": [len(x)], "data": x}]}

    assert _decode(specs, body([None, "12"], ["3", ""])).columns["U"].to_pylist() == ["", "12"]
    with pytest.raises(RequestError, match=r"'U': ids must be integers within int64's range, in decimal \(the feature "
                                           r"is not hashed\), got 'abc' at position 0"):
        _decode(specs, body(["abc"], ["3"]))
    for hexadecimal in ("0x1A9", "-0XFF", "+5"):  # Arrow's cast reads them; training's reader does not
        with pytest.raises(RequestError, match=rf"'U': ids must be integers within .*, got '{re.escape(hexadecimal)}'"):
            _decode(specs, body([hexadecimal], ["3"]))
    with pytest.raises(RequestError, match="'X': BYTES values must be numbers \\(or empty for missing\\), got 'abc' at "
                                           "position 0"):
        _decode(specs, body(["1"], ["abc"]))
