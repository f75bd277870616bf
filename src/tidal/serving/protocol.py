"""The Open Inference Protocol (KServe v2) body: JSON tensors and the binary extension.

A request names one input tensor per raw column the features read, as in training
(Criteo's ``C1``...``C26`` and ``I1``...``I13``, say). A request scoring n candidates
carries each column by the side of the features that read it::

    user     C2 [1]         the user's one value, for every candidate (so too a
                            user column an item feature reads, for a cross)
    context  hour [1]|[n]   one value for every candidate, or one per candidate
    item     C9 [n]         one value per candidate, never broadcast: a short
                            column is refused (400), not read as wrong scores

(``[n, 1]`` reads as ``[n]``). Ids come as BYTES (the strings of the data
files), INT64 or INT32 (model metadata gives integer ids, ``hashed: false``, as INT64 and
hashed ids as BYTES); numbers as FP64 (exact: training parses numbers as float64), FP32,
INT64 or BYTES. An empty string is a missing value, as an empty field of a file; a
missing number may also come as the string ``NaN`` (as training's files hold it) or as
a null or NaN in FP32/FP64 data. A multi-value column comes as its joined strings (``"a|b|c"``, as in files) or
as all values flat plus a ``<column>.lengths`` tensor with one bag length per candidate. With the binary
extension the JSON header is followed by the raw tensors (header length in
``Inference-Header-Content-Length``; BYTES elements each prefixed by a 4-byte
little-endian length).

Every check happens here, before a request joins a batch: anything malformed is a
`RequestError` with the reason (400), so one bad request never fails a batch.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidal.config import BAG_LENGTHS, DenseFeature, RunConfig, SparseFeature
from tidal.data.readers import FLOAT32_MAX, INTEGER_PATTERN, WeightedBags, weighted_values
from tidal.errors import TidalError

__all__ = ["DecodedRequest", "InputSpec", "RequestError", "context_inputs", "decode_request", "encode_response",
           "infer_request", "input_specs", "json_object"]

HEADER = "inference-header-content-length"
MAX_SEQUENCE_ID = 256  # characters of a string sequence_id
LENGTHS = BAG_LENGTHS
_NUMERIC = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4"}
_DATATYPES = frozenset(("BYTES", *_NUMERIC))


class RequestError(TidalError):
    """A malformed request: answered with `status` and the message, the server goes on.
    With `closes`, the answer closes the connection: the request's body is still coming."""

    def __init__(self, message: str, status: int = 400, *, closes: bool = False) -> None:
        super().__init__(message)
        self.status, self.closes = status, closes


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """One raw column a request must carry: what it holds and whose value it is."""

    name: str
    kind: str  # ids (hashed strings) | integer (raw integer ids) | number
    # user (one value per request) | item (one per candidate) | both (a user value some item feature reads too);
    # a context column is "item" here, as in bundles' manifests (`context_inputs` names those)
    side: str
    separator: str | None = None  # a multi-value column
    weight_separator: str | None = None  # its values carry weights ("a:0.5|b:2")
    also: tuple[str, ...] = ()  # other kinds the column is read as (each checked): integer, number


@dataclass(frozen=True, kw_only=True)
class DecodedRequest:
    """A checked request: its columns as Arrow arrays, candidates, sequence and outputs."""

    columns: dict[str, pa.Array]
    rows: int  # candidates
    request_id: str | None = None
    sequence_id: int | str | None = None  # 5 and "5" are two sequences, as in Triton
    sequence_start: bool = False
    sequence_end: bool = False
    outputs: list[str] | None = None  # requested output names; None: all
    binary_outputs: set[str] = field(default_factory=set)


def input_specs(config: RunConfig) -> dict[str, InputSpec]:
    """The request inputs of a config's features, by column name."""
    return {column: _spec(column, features) for column, features in _readers(config).items()}


def context_inputs(config: RunConfig) -> frozenset[str]:
    """The inputs only context features read: a request may send one value of each for
    every candidate. (An input an item feature reads too has one value per candidate.)"""
    return frozenset(column for column, features in _readers(config).items()
                     if all(f.side == "context" for f in features))


def _readers(config: RunConfig) -> dict[str, list[SparseFeature | DenseFeature]]:
    """The features that read each raw column, by column name, in the config's order."""
    readers: dict[str, list[SparseFeature | DenseFeature]] = {}
    for feature in config.features:
        if isinstance(feature, SparseFeature):
            for column in feature.columns:
                readers.setdefault(column, []).append(feature)
        elif isinstance(feature, DenseFeature):
            readers.setdefault(feature.column, []).append(feature)
    return readers


def _spec(column: str, features: list[SparseFeature | DenseFeature]) -> InputSpec:
    kinds = {_kind(f) for f in features}
    sides = {"user" if f.side == "user" else "item" for f in features}
    separators = {f.separator for f in features if isinstance(f, SparseFeature) and f.separator}
    weighted = {f.weight_separator for f in features if isinstance(f, SparseFeature) and f.weight_separator}
    kind = next(iter(kinds)) if len(kinds) == 1 else "ids"  # read several ways: keep the file's strings
    # split one way by all its features, a column may come as values and lengths; split
    # several ways, only as the file's strings, which each feature splits its own way
    return InputSpec(name=column, kind=kind, side=sides.pop() if len(sides) == 1 else "both",
                     separator=separators.pop() if len(separators) == 1 else None,
                     weight_separator=weighted.pop() if len(weighted) == 1 else None,
                     also=tuple(sorted(kinds - {kind, "ids"})))


def _kind(feature: SparseFeature | DenseFeature) -> str:
    if isinstance(feature, DenseFeature) or feature.buckets is not None:
        return "number"
    return "ids" if feature.hashed else "integer"


# ---------------------------------------------------------------------- decoding


def decode_request(body: bytes, header_length: str | None, specs: dict[str, InputSpec],
                   outputs: Sequence[str], *, context: Collection[str] = frozenset()) -> DecodedRequest:
    """Parse and check one infer request body against the model's inputs and outputs.
    `context`: the item-side inputs that may come as one value for every candidate
    (`context_inputs`); every other item input must have one value per candidate."""
    header, binary = _split_body(body, header_length)
    request = _json_object(header)
    tensors = _tensors(request, binary)
    params = _parameters(request)
    unknown = sorted(set(tensors) - set(specs) - {s + LENGTHS for s in specs if specs[s].separator})
    if unknown:
        raise RequestError(f"unknown inputs {unknown}; the model takes {sorted(specs)}")
    mode = "stateless" if params["sequence_id"] is None else "start" if params["sequence_start"] else "continue"
    columns = _columns(tensors, specs, mode, context)
    rows = _rows(columns, specs, context, bagged={n for n in specs if n + LENGTHS in tensors})
    wanted, binary_outputs = _outputs(request, outputs, params.pop("binary_data_output"))
    return DecodedRequest(columns=columns, rows=rows, request_id=_request_id(request), outputs=wanted,
                          binary_outputs=binary_outputs, **params)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        size = int(header_length)
    except ValueError:
        raise RequestError(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    if not 0 < size <= len(body):
        raise RequestError(f"Inference-Header-Content-Length is {size}, but the body has {len(body)} bytes")
    return body[:size], memoryview(body)[size:]


def json_object(body: bytes, expected: str = "a JSON object") -> dict:
    """A request body that must be a JSON object; `expected` describes it in the error."""
    if not body or body.isspace():
        raise RequestError(f"the request has no body; expected {expected}")
    try:
        text = body.decode("utf-8-sig")  # json.loads would also take UTF-16 and UTF-32, which JSON sent may not be
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request is not UTF-8 text, as JSON sent between systems must be: {exc}") from None
    try:
        value = json.loads(text, object_pairs_hook=_keys_once)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, an integer of 4,300+ digits
        raise RequestError(f"the request is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise RequestError(f"expected {expected}, got {type(value).__name__}")
    return value


def _keys_once(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are distinct: one named twice is refused, not read as its
    last value (a gateway reading the first would see another request)."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise RequestError(f"the key {twice!r} comes twice in one JSON object; name each key once")
    return value


def _json_object(header: bytes) -> dict:
    expected = "a JSON object with an 'inputs' list of tensors"
    request = json_object(header, expected)
    if not isinstance(request.get("inputs"), list):
        raise RequestError(f"expected {expected}")
    return request


def _tensors(request: dict, binary: memoryview) -> dict[str, np.ndarray | pa.Array]:
    """Each input as a flat array (numbers) or Arrow strings (BYTES), sizes checked."""
    tensors, strings, position = {}, {}, 0
    for k, tensor in enumerate(request["inputs"]):
        name, datatype, count, nested = _tensor_header(k, tensor)
        if name in tensors or name in strings:
            raise RequestError(f"input {name!r} comes twice")
        size = _parameters_of(tensor, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise RequestError(f"input {name!r} has both data and parameters.binary_data_size; send its values "
                                   f"one way")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RequestError(f"input {name!r}: binary_data_size must be a byte count (an integer >= 0), got {size!r}")
            if position + size > len(binary):
                raise RequestError(f"input {name!r}: binary_data_size {size} overruns the {len(binary)} binary bytes")
            tensors[name] = _from_binary(name, datatype, count, binary[position : position + size])
            position += size
        elif "data" in tensor:
            data = _flat(name, count, nested, tensor["data"])
            if datatype == "BYTES":
                strings[name] = data
            else:
                tensors[name] = _from_json(name, datatype, data)
        else:
            raise RequestError(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    if position != len(binary):
        raise RequestError(f"the inputs' binary_data_size add up to {position} bytes, but {len(binary)} follow the header")
    return tensors | _strings_at_once(strings)


def _flat(name: str, count: int, nested: bool, data: object) -> list:
    """The values of a JSON tensor: a flat list, or (shape [n, 1]) a list of one-value lists."""
    if nested and type(data) is list and all(type(d) is list and len(d) == 1 for d in data):
        data = [d[0] for d in data]
    if type(data) is not list or len(data) != count:
        raise RequestError(f"input {name!r}: data must be a list of {count} values (its shape), "
                           f"got {len(data) if type(data) is list else type(data).__name__}")
    return data


def _utf8_strings(values: list) -> bool:
    """Whether every value is a string that encodes as UTF-8 (or a null)."""
    for value in values:
        if value is None:
            continue
        if type(value) is not str:
            return False
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
    return True


def _strings_at_once(lists: dict[str, list]) -> dict[str, pa.Array]:
    """The JSON strings of every BYTES input, converted in one call (per input, slices)."""
    try:
        joined = pa.array(list(itertools.chain.from_iterable(lists.values())), pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid, UnicodeEncodeError):
        bad = next((n for n, values in lists.items() if not _utf8_strings(values)), "?")
        raise RequestError(f"input {bad!r}: BYTES data must be strings of UTF-8 text") from None
    if joined.null_count:  # null reads as missing, as an empty field of a file does
        joined = pc.fill_null(joined, "")
    arrays, start = {}, 0
    for name, values in lists.items():
        arrays[name] = joined.slice(start, len(values))
        start += len(values)
    return arrays


def _tensor_header(k: int, tensor: object) -> tuple[str, str, int, bool]:
    """(name, datatype, n, nested) of a tensor of shape [n] or [n, 1]."""
    if type(tensor) is not dict or type(tensor.get("name")) is not str:
        raise RequestError(f"inputs[{k}] must be an object with name, datatype, shape and data")
    name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
    if datatype not in _DATATYPES:
        raise RequestError(f"input {name!r}: datatype must be one of BYTES, {', '.join(_NUMERIC)}; got {datatype!r}")
    if type(shape) is not list or not 1 <= len(shape) <= 2 or type(shape[0]) is not int or shape[0] < 0 \
            or (len(shape) == 2 and (type(shape[1]) is not int or shape[1] != 1)):
        raise RequestError(f"input {name!r}: shape must be [n] or [n, 1] with n >= 0, got {shape!r}")
    return name, datatype, shape[0], len(shape) == 2


def _from_json(name: str, datatype: str, flat: list) -> np.ndarray:
    """The values of a numeric tensor; null in floating point data is a missing value
    (NaN, as in training's files)."""
    allowed = (int,) if datatype.startswith("INT") else (int, float, type(None))
    if not all(type(v) in allowed for v in flat):
        missing = " (a missing value comes as an empty BYTES string; a missing number also as null in FP32 or FP64 data)"
        raise RequestError(f"input {name!r}: {datatype} data must be "
                           f"{'integers' + missing if len(allowed) == 1 else 'numbers or null (missing)'}")
    try:
        with np.errstate(over="ignore"):
            values = np.asarray(flat, dtype=_NUMERIC[datatype])
    except OverflowError:
        raise RequestError(f"input {name!r}: a value does not fit {datatype}") from None
    if values.dtype.kind == "f" and np.isinf(values).any():
        k = int(np.flatnonzero(np.isinf(values))[0])
        if np.isfinite(float(flat[k])):
            raise RequestError(f"input {name!r}: a value does not fit {datatype}: {flat[k]!r} at position {k}")
    return values


def _from_binary(name: str, datatype: str, count: int, raw: memoryview) -> np.ndarray | pa.Array:
    if datatype != "BYTES":
        dtype = np.dtype(_NUMERIC[datatype])
        if len(raw) != count * dtype.itemsize:
            raise RequestError(f"input {name!r}: {count} {datatype} values take {count * dtype.itemsize} bytes, "
                               f"binary_data_size says {len(raw)}")
        return np.frombuffer(raw, dtype=dtype)
    if count > len(raw) // 4:  # each element takes at least its 4-byte length
        raise RequestError(f"input {name!r}: {count} BYTES elements need at least {4 * count} bytes, "
                           f"binary_data_size says {len(raw)}")
    buffer = np.frombuffer(raw, dtype=np.uint8)
    offsets, data = np.empty(count + 1, np.int32), np.empty(len(raw), np.uint8)
    used = _unpack_bytes(buffer, count, offsets, data)
    if used < 0:
        raise RequestError(f"input {name!r}: its {len(raw)} binary bytes are not {count} length-prefixed BYTES elements")
    strings = pa.Array.from_buffers(pa.string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data[:used])])
    try:
        strings.validate(full=True)
    except pa.ArrowInvalid:
        raise RequestError(f"input {name!r}: BYTES elements must be UTF-8 text") from None
    return strings


@numba.njit(nogil=True, cache=True)
def _unpack_bytes(buffer, count, offsets, data):  # type: ignore[no-untyped-def]
    """Length-prefixed elements to Arrow offsets and data; -1 if they do not add up."""
    position, used = 0, 0
    for i in range(count):
        if position + 4 > buffer.shape[0]:
            return -1
        n = (np.int64(buffer[position]) | np.int64(buffer[position + 1]) << 8
             | np.int64(buffer[position + 2]) << 16 | np.int64(buffer[position + 3]) << 24)
        position += 4
        if position + n > buffer.shape[0]:
            return -1
        offsets[i] = used
        data[used : used + n] = buffer[position : position + n]
        used += n
        position += n
    offsets[count] = used
    return used if position == buffer.shape[0] else -1


def _parameters_of(item: dict, where: str) -> dict:
    """The `parameters` object of a request, tensor or output (none: empty)."""
    params = item.get("parameters")
    if params is None:
        return {}
    if type(params) is not dict:
        raise RequestError(f"{where}: parameters must be an object, got {type(params).__name__}")
    return params


def _parameters(request: dict) -> dict:
    params = _parameters_of(request, "the request")
    sequence_id = params.get("sequence_id")
    if sequence_id is not None and not isinstance(sequence_id, (int, str)) or isinstance(sequence_id, bool):
        raise RequestError(f"sequence_id must be an integer or a string, got {sequence_id!r}")
    if isinstance(sequence_id, str) and len(sequence_id) > MAX_SEQUENCE_ID:
        raise RequestError(f"sequence_id is {len(sequence_id)} characters long; at most {MAX_SEQUENCE_ID} are taken")
    if isinstance(sequence_id, int) and not 0 <= sequence_id < 1 << 64:
        raise RequestError(f"an integer sequence_id must be an unsigned 64-bit number, got {sequence_id}")
    flags = {k: params.get(k, False) for k in ("sequence_start", "sequence_end", "binary_data_output")}
    bad = {k: v for k, v in flags.items() if not isinstance(v, bool)}
    if bad:
        raise RequestError(f"parameters {sorted(bad)} must be true or false, got {bad}")
    active = sequence_id not in (None, 0, "")
    if not active and (flags["sequence_start"] or flags["sequence_end"]):
        raise RequestError(_flags_without_sequence(sequence_id, [k for k in ("sequence_start", "sequence_end")
                                                                 if flags[k]]))
    return {"sequence_id": sequence_id if active else None, "sequence_start": flags["sequence_start"],
            "sequence_end": flags["sequence_end"], "binary_data_output": flags["binary_data_output"]}


def _flags_without_sequence(sequence_id: int | str | None, flags: list[str]) -> str:
    """Why sequence flags without a sequence are refused: no id came, or 0 or "" (which,
    as in Triton, mean no sequence)."""
    named = " and ".join(flags)
    came = "none" if sequence_id is None else \
        f"{sequence_id!r}, which is not a sequence id (as in Triton, 0 and \"\" mean no sequence)"
    return (f"{named} {'needs' if len(flags) == 1 else 'need'} a sequence: expected a non-zero sequence_id, got "
            f"{came}; send the session's id (an unsigned integer or a non-empty string), or leave {named} out")


def _request_id(request: dict) -> str | None:
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(f"id must be a string, got {request_id!r}")
    return request_id


# ---------------------------------------------------------------------- columns


def _columns(tensors: dict, specs: dict[str, InputSpec], mode: str, context: Collection[str]) -> dict[str, pa.Array]:
    """The columns as Arrow arrays (not yet broadcast).

    `mode` is stateless, start or continue: a continuing session's request carries no
    user inputs, nor the user's values that item features read too (side "both"): they
    came with its start. A sequence's request may come without candidates: a start with
    only the user's inputs, an end with none at all. `context` names the context inputs,
    for the message of a request that lacks some.
    """
    required = [s for s in specs.values() if not (mode == "continue" and s.side != "item")]
    if mode != "stateless" and not any(specs[n].side == "item" for n in tensors if n in specs):
        required = [s for s in required if s.side != "item"]  # no candidates
    missing = [s.name for s in required if s.name not in tensors]
    if missing:
        raise RequestError(f"missing inputs {missing}; the model reads " +  # each input's side as its metadata says
                           ", ".join(f"{s.name} ({'context' if s.name in context else s.side})" for s in specs.values()))
    sent = sorted(n for n in tensors if n in specs and specs[n].side != "item")
    if mode == "continue" and sent:
        raise RequestError(f"a continuing sequence request carries no user inputs: they came with sequence_start; "
                           f"got {sent}")
    texts = {s.name: tensors[s.name] for s in required if s.kind == "number" and isinstance(tensors[s.name], pa.Array)
             and not (s.separator and s.name + LENGTHS in tensors)}
    return _numbers_from_text(texts) | {s.name: _column(s, tensors) for s in required if s.name not in texts}


def _column(spec: InputSpec, tensors: dict) -> pa.Array:
    value = tensors[spec.name]
    if spec.weight_separator is not None and not isinstance(value, pa.Array):
        raise RequestError(f"input {spec.name!r}: weighted bags come as BYTES strings 'id{spec.weight_separator}weight', "
                           f"got {value.dtype} values")
    if spec.kind != "number" and not isinstance(value, pa.Array) and value.dtype.kind == "f":
        raise RequestError(f"input {spec.name!r}: ids must be BYTES, INT64 or INT32, got floating point values")
    if spec.separator is not None and spec.name + LENGTHS in tensors:
        joined = _joined(spec, value, tensors[spec.name + LENGTHS])
        if spec.weight_separator is not None:
            _check_weighted_values(spec, value)
        return _checked(spec, joined)
    if spec.kind == "number":  # strings went to _numbers_from_text
        return _numbers(spec.name, value)
    if isinstance(value, pa.Array):
        if spec.weight_separator is not None:
            _check_weighted_bags(spec, value)
        return _checked(spec, value)
    return pc.cast(pa.array(value), pa.string())


def _checked(spec: InputSpec, strings: pa.Array) -> pa.Array:
    """`strings`, once every way the features read them parses (integer ids, numbers)."""
    for kind in {spec.kind, *spec.also}:
        if kind == "integer":
            _check_integers(spec.name, strings)
        elif kind == "number":
            _numbers_from_text({spec.name: strings})
    return strings


def _check_weighted_bags(spec: InputSpec, bags: pa.Array) -> None:
    """Every value of every bag of a weighted input has its weight."""
    check = WeightedBags(spec.separator, spec.weight_separator)  # type: ignore[arg-type]
    rows, values = check.refused(bags)
    if rows.size:
        raise RequestError(f"input {spec.name!r}, bag {rows[0]}: {check.problem(values[0])}; expected {check.expected}")


def _check_weighted_values(spec: InputSpec, values: pa.Array) -> None:
    """Every value of a weighted input sent flat (beside its lengths) has its weight."""
    check = WeightedBags(spec.separator, spec.weight_separator)  # type: ignore[arg-type]
    bad = np.flatnonzero(np.isnan(weighted_values(values, check.weight_separator)[1]))
    if bad.size:
        raise RequestError(f"input {spec.name!r}, value {bad[0]}: {check.problem(values[int(bad[0])].as_py())}; "
                           f"expected {check.value_expected}")


def _numbers(name: str, value: np.ndarray) -> pa.Array:
    """float64 numbers, NaN (missing, as in training's files) given as null. FP32 values
    are read as training reads a float32 file value, by their shortest decimal (0.7f as
    0.7, not 0.69999998), so that one on a bucket boundary falls where it fell there."""
    if value.dtype == np.float32:
        numbers = pc.cast(pc.cast(pa.array(value), pa.string()), pa.float64()).to_numpy(zero_copy_only=False)
    else:
        numbers = value.astype(np.float64)
    bad = np.flatnonzero(_beyond_float32(numbers))
    if bad.size:
        raise RequestError(f"input {name!r}: values must be finite and within float32's range (|x| <= "
                           f"{FLOAT32_MAX}), as in training's files, or NaN (missing); got {numbers[bad[0]]} at "
                           f"position {bad[0]}")
    return pa.array(numbers, mask=np.isnan(numbers))


def _beyond_float32(numbers: np.ndarray) -> np.ndarray:
    """Which numbers training's files could not hold: infinite or past float32's range."""
    with np.errstate(invalid="ignore"):
        return np.abs(numbers) > FLOAT32_MAX


def _numbers_from_text(texts: dict[str, pa.Array]) -> dict[str, pa.Array]:
    """Number inputs sent as strings, parsed in one call: empty or NaN (as Spark and numpy
    write it) means missing (null), as in training's files."""
    if not texts:
        return {}
    joined = pa.concat_arrays(list(texts.values()))
    try:
        numbers = _parse(joined, pa.float64())
    except pa.ArrowInvalid:
        bad = next(n for n, a in texts.items() if not _parses(a))
        position, value = _first_unparsed(texts[bad], pa.float64())
        raise RequestError(f"input {bad!r}: BYTES values must be numbers (or empty for missing), got {value!r} at "
                           f"position {position}") from None
    values = numbers.to_numpy(zero_copy_only=False)  # null as NaN
    numbers = pa.array(values, mask=np.isnan(values))
    bad = np.flatnonzero(_beyond_float32(values))
    arrays, start = {}, 0
    for name, text in texts.items():
        if bad.size and start <= bad[0] < start + len(text):
            raise RequestError(f"input {name!r}: values must be finite and within float32's range (|x| <= "
                               f"{FLOAT32_MAX}), as in training's files; got {values[bad[0]]} at position "
                               f"{bad[0] - start}")
        arrays[name] = numbers.slice(start, len(text))
        start += len(text)
    return arrays


def _parses(text: pa.Array, to: pa.DataType = pa.float64()) -> bool:
    try:
        _parse(text, to)
    except pa.ArrowInvalid:
        return False
    return True


def _first_unparsed(text: pa.Array, to: pa.DataType) -> tuple[int, str]:
    """The position and value of the first string of `text` that is not a `to` (one is not)."""
    return next((i, value) for i, value in enumerate(text.to_pylist()) if not _parses(pa.array([value]), to))


def _parse(text: pa.Array, to: pa.DataType) -> pa.Array:
    """Strings as numbers of type `to`, empty strings as nulls; ArrowInvalid if one is not."""
    return pc.cast(pc.if_else(pc.equal(pc.utf8_length(text), 0), None, text), to)


def _check_integers(name: str, value: pa.Array) -> None:
    """Every string an integer id within int64's range, or empty, as training's files hold
    them (Arrow's cast also takes '+5' and hexadecimal, which a file's reader does not)."""
    if len(value) == 0:
        return
    written = pc.or_(pc.match_substring_regex(value, INTEGER_PATTERN), pc.equal(pc.utf8_length(value), 0))
    if not pc.all(written).as_py():
        position = pc.index(written, False).as_py()
    elif not _parses(value, pa.int64()):
        position = _first_unparsed(value, pa.int64())[0]
    else:
        return
    raise RequestError(f"input {name!r}: ids must be integers within int64's range, in decimal (the feature is not "
                       f"hashed), got {value[position].as_py()!r} at position {position}")


def _joined(spec: InputSpec, values: np.ndarray | pa.Array, lengths: np.ndarray | pa.Array) -> pa.Array:
    """Flat values + bag lengths as the joined strings a data file holds ("a|b|c")."""
    if isinstance(lengths, pa.Array) or lengths.dtype.kind != "i" or (lengths < 0).any():
        raise RequestError(f"input {spec.name + LENGTHS!r}: lengths must be INT32 or INT64 values >= 0")
    strings = values if isinstance(values, pa.Array) else pc.cast(pa.array(values), pa.string())
    if len(lengths) and int(lengths.max()) > len(strings):
        raise RequestError(f"input {spec.name + LENGTHS!r}: a bag of {int(lengths.max())} values, "
                           f"but {spec.name!r} has {len(strings)}")
    if int(lengths.sum()) != len(strings):
        raise RequestError(f"input {spec.name!r}: {len(strings)} values, but its lengths add up to {int(lengths.sum())}")
    if len(strings) and pc.any(pc.match_substring(strings, spec.separator)).as_py():
        raise RequestError(f"input {spec.name!r}: a value holds the separator {spec.separator!r}")
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), strings), spec.separator)


def _rows(columns: dict[str, pa.Array], specs: dict[str, InputSpec], context: Collection[str],
          bagged: Collection[str] = frozenset()) -> int:
    """The number of candidates: the values of every item input. A user input has one
    value; so may a `context` input, for every candidate. `bagged`: the inputs whose
    bags came as flat values and lengths (their count is that of their lengths)."""
    sizes = {c: len(columns[c]) for c in specs if c in columns}  # in the model's order
    users = {c: n for c, n in sizes.items() if specs[c].side != "item" and n != 1}
    if users:
        raise RequestError(f"user inputs carry one value per request, got {users}")
    items = {c: n for c, n in sizes.items() if specs[c].side == "item"}
    if not items:
        return 0
    rows, example = _candidates(items, context)
    for name, n in items.items():
        if n != rows and not (n == 1 and name in context):
            shown = name + LENGTHS if name in bagged else name
            raise RequestError(_unlike_candidates(shown, n, rows, example, name in context))
    return rows


def _candidates(items: dict[str, int], context: Collection[str]) -> tuple[int, str]:
    """(candidates, an input that has one value per candidate): the size most item
    inputs have (a tie: the larger), context inputs counted only where no other is."""
    sized = {c: n for c, n in items.items() if c not in context} or items
    counts = Counter(sized.values())
    rows = max(counts, key=lambda n: (counts[n], n))
    return rows, next(c for c, n in sized.items() if n == rows)


def _unlike_candidates(name: str, n: int, rows: int, example: str, is_context: bool) -> str:
    """Why item input `name` of `n` values (or, named COLUMN.lengths, `n` bags) is
    refused in a request of `rows` candidates."""
    expected = f"{rows} value{'s' if rows != 1 else ''} (one per candidate, as {example!r} has)"
    if is_context:
        return (f"input {name!r} is a context feature: expected {expected} or 1 (the same for every candidate), "
                f"got {n}")
    return (f"input {name!r} is an item feature: expected {expected}, got {n}; send every item input with one value "
            f"per candidate (only user and context inputs may come once for all of them)")


def _outputs(request: dict, outputs: Sequence[str], binary_all: bool) -> tuple[list[str] | None, set[str]]:
    wanted = request.get("outputs")
    if wanted is None or wanted == []:  # none named: all of them, as Triton answers
        return None, set(outputs) if binary_all else set()
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted):
        raise RequestError(f"outputs must be a list of objects with a name, got {json.dumps(wanted)[:200]}")
    names = [o["name"] for o in wanted]
    unknown = sorted(set(names) - set(outputs))
    if unknown:
        raise RequestError(f"unknown outputs {unknown}; the model gives {list(outputs)}")
    if len(set(names)) < len(names):
        raise RequestError(f"outputs names {sorted({n for n in names if names.count(n) > 1})} more than once")
    binary = set()
    for o in wanted:  # an output's own binary_data overrides binary_data_output
        params = _parameters_of(o, f"output {o['name']!r}")
        asked = next((key for key in ("classification", "class_count") if params.get(key, 0)), None)
        if asked:  # tritonclient's InferRequestedOutput(class_count=k) sends "classification": k
            raise RequestError(f"output {o['name']!r}: {asked} asks for Triton's classification extension, "
                               f"which this server does not have; its outputs are one probability per candidate")
        flag = params.get("binary_data", binary_all)
        if not isinstance(flag, bool):
            raise RequestError(f"output {o['name']!r}: parameter binary_data must be true or false, got {flag!r}")
        if flag:
            binary.add(o["name"])
    return names, binary


# ---------------------------------------------------------------------- encoding


def infer_request(rows: pa.RecordBatch, specs: dict[str, InputSpec], *, user_row: int = 0, with_user: bool = True,
                  parameters: dict | None = None) -> dict:
    """A JSON infer request scoring the candidates `rows` (raw string columns, as read
    from data files) for the user of row `user_row`; without `with_user`, the user
    inputs are left out (a continuing session's page)."""
    inputs = []
    for spec in specs.values():
        if spec.side != "item" and not with_user:
            continue
        values = rows.column(spec.name).to_pylist()
        values = values[user_row : user_row + 1] if spec.side != "item" else values
        inputs.append({"name": spec.name, "datatype": "BYTES", "shape": [len(values)], "data": values})
    return {"inputs": inputs, **({"parameters": parameters} if parameters else {})}



def encode_response(model: str, decoded: DecodedRequest, outputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (the binary header length, if any)."""
    names = decoded.outputs if decoded.outputs is not None else list(outputs)
    described, raw = [], []
    for name in names:
        values = np.ascontiguousarray(outputs[name], dtype="<f4")
        tensor: dict = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
        if name in decoded.binary_outputs:
            tensor["parameters"] = {"binary_data_size": values.nbytes}
            raw.append(values.tobytes())
        else:
            tensor["data"] = values.tolist()
        described.append(tensor)
    response: dict = {"model_name": model, "model_version": "1", "outputs": described}
    if decoded.request_id is not None:
        response["id"] = decoded.request_id
    header = json.dumps(response, separators=(",", ":"), allow_nan=False).encode()  # NaN is not JSON: a 500, not a body
    if not raw:
        return header, {}
    return header + b"".join(raw), {"Inference-Header-Content-Length": str(len(header))}
