"""The predictor: training's extraction, the trained model's scores, fusion, buckets, user state."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from serving_helpers import file_rows, with_user_of

from tidal.config import Fusion
from tidal.errors import BatchError, ConfigError
from tidal.serving import Piece, Predictor, fuse
from tidal.serving.protocol import decode_request, infer_request, input_specs


@pytest.fixture(scope="module")
def predictor(bundle):
    return Predictor(bundle)


def _piece(predictor, rows: pa.RecordBatch, user_row: int = 0) -> Piece:
    return predictor.piece(_columns(predictor, rows, user_row), rows.num_rows)


def _columns(predictor, rows: pa.RecordBatch, user_row: int = 0) -> dict[str, pa.Array]:
    """The columns of a request of `rows`, as the protocol decodes them."""
    decoded = decode_request(_json(infer_request(rows, input_specs(predictor.config), user_row=user_row)), None,
                             input_specs(predictor.config), [*predictor.targets, "score"])
    return decoded.columns


def _json(body: dict) -> bytes:
    import json

    return json.dumps(body).encode()


def _trainer_scores(trainer, rows: pa.RecordBatch) -> np.ndarray:
    batch = trainer.extract(rows)
    with torch.no_grad():
        trainer.model.eval()
        pooled, _ = trainer.collection.forward(batch, train=False)
        return torch.sigmoid(trainer.model(pooled, torch.tensor(batch.dense))).numpy()


def test_requests_give_the_ids_training_gives_for_the_same_rows(trainer, predictor):
    rows = with_user_of(file_rows(trainer, 40), input_specs(trainer.config))
    piece = _piece(predictor, rows)
    trained_batch = trainer.extract(rows)
    served_items = predictor._item_extract(piece.items)
    served_user = predictor._user_extract(piece.user)
    for key in served_items.keys:
        lo, hi = trained_batch.feature_range(key)
        mine = served_items.feature_range(key)
        np.testing.assert_array_equal(served_items.values[mine[0] : mine[1]], trained_batch.values[lo:hi])
    for key in served_user.keys:
        lo, hi = trained_batch.feature_range(key)
        mine = served_user.values[slice(*served_user.feature_range(key))]  # the user's bag, once
        np.testing.assert_array_equal(trained_batch.values[lo:hi], np.tile(mine, rows.num_rows))


def test_scores_equal_the_trained_model_on_the_same_rows(trainer, predictor):
    rows = with_user_of(file_rows(trainer, 70), input_specs(trainer.config), user_row=5)
    served = predictor.predict([_piece(predictor, rows, user_row=5)])
    np.testing.assert_allclose(served, _trainer_scores(trainer, rows), rtol=1e-5, atol=1e-6)
    assert served.shape == (70, 2)


def test_the_dense_stage_sees_only_bucket_sizes_and_padding_never_reaches_an_output(trainer, predictor, monkeypatch):
    rows = with_user_of(file_rows(trainer, 70), input_specs(trainer.config))
    piece = _piece(predictor, rows)
    alone = np.concatenate([predictor.predict([_piece(predictor, rows.slice(i, 1))]) for i in range(3)])
    seen = []
    program = predictor._program
    counting = SimpleNamespace(forward=lambda p, d: seen.append(p.shape[0]) or program(p, d))
    monkeypatch.setattr(predictor, "_program", counting)
    np.testing.assert_allclose(predictor.predict([piece.__class__(items=piece.items.slice(0, 3), user=piece.user)]),
                               alone, rtol=1e-6)
    predictor.predict([piece])  # 70 rows: one bucket of 256
    assert seen == [4, 256]
    with pytest.raises(BatchError, match="do not fit the largest bucket"):
        predictor.bucket(257)
    with pytest.raises(BatchError, match="expected pooled"):
        predictor._check_shapes(torch.zeros(5, 28, 8), torch.zeros(5, 13))
    with pytest.raises(BatchError, match="expected pooled"):  # the dense part is guarded too
        predictor._check_shapes(torch.zeros(4, 28, 8), torch.zeros(4, 12))
    from tidal.serving.predictor import SparseOutput

    with pytest.raises(BatchError, match=r"expected pooled .* got \[4, 27, 8\]"):  # before the program runs
        predictor.dense(SparseOutput(pooled=torch.zeros(3, 27, 8), dense=torch.zeros(3, 13), program=counting.forward))
    assert seen == [4, 256]
    from tidal.serving import predictor as module

    padded = module._padded
    monkeypatch.setattr(module, "_padded", lambda tensor, rows: padded(tensor, rows + 1))  # a padding slip
    with pytest.raises(BatchError, match="with bucket in"):  # the guard runs before every dense call
        predictor.predict([piece])


def test_arguments_of_another_kind_are_refused_by_name(trainer, predictor, bundle):
    rows = with_user_of(file_rows(trainer, 5), input_specs(trainer.config))
    piece = _piece(predictor, rows)
    for call in (predictor.predict, predictor.sparse):
        with pytest.raises(BatchError, match=r"^a list of Pieces \(Predictor.piece makes one\) is scored, got Piece$"):
            call(piece)
    with pytest.raises(BatchError, match=r"^dense takes the SparseOutput of Predictor.sparse, got NoneType$"):
        predictor.dense(None)
    targets = len(predictor.targets)
    for wrong, got in [(np.array([0.5, 0.2]), "shape [2]"), ([[0.5]], "list"), (np.zeros((2, targets + 1)),
                                                                               f"shape [2, {targets + 1}]")]:
        for call in (predictor.fuse, predictor.outputs, lambda p: fuse(predictor.fusion, p, predictor.targets)):
            with pytest.raises(BatchError, match=rf"^probabilities must be a numpy array \[n, {targets}\] \(one column "
                                                 rf"per target: .*\), got {re.escape(got)}$"):
                call(wrong)
    with pytest.raises(ConfigError, match=r"^fuse: fusion: expected Fusion, got str$"):
        fuse("sum", np.zeros((2, targets)), predictor.targets)
    with pytest.raises(ConfigError, match=r"^update takes a list of Deltas \(.*\), got list holding other objects$"):
        predictor.update([5])
    with pytest.raises(ConfigError, match=r"^reload takes the bundle's folder \(a str or Path\), got NoneType$"):
        predictor.reload(None)
    with pytest.raises(BatchError, match=r"^rows is the number of candidates, a whole number >= 0; got '5'$"):
        predictor.piece(_columns(predictor, rows), "5")
    with pytest.raises(ConfigError, match=r"Predictor: serving"):
        Predictor(bundle, serving={"buckets": [1, 8]})


def test_a_cached_user_state_scores_like_the_user_row(trainer, predictor):
    rows = with_user_of(file_rows(trainer, 30), input_specs(trainer.config))
    piece = _piece(predictor, rows)
    state = predictor.user_state(piece.user)
    assert state.pooled.shape == (1, 3, 8) and state.dense.shape == (1, 2)
    # the cross's user column, copied out of the request's strings: a slice would keep them all alive
    assert list(state.shared) == ["C1"] and piece.user.column("C1").get_total_buffer_size() > 1000
    assert state.shared["C1"].get_total_buffer_size() < 64
    assert state.user.num_rows == 1 and state.user.get_total_buffer_size() < 64 * state.user.num_columns  # copied too
    assert state.nbytes == state.pooled.nbytes + state.dense.nbytes + state.user.get_total_buffer_size() \
        + state.shared["C1"].get_total_buffer_size()
    np.testing.assert_array_equal(predictor.predict([Piece(items=piece.items, state=state)]), predictor.predict([piece]))


def test_pieces_of_different_users_are_scored_together_as_alone(trainer, predictor):
    rows = file_rows(trainer, 40)
    specs = input_specs(trainer.config)
    a, b, c, d = (_piece(predictor, with_user_of(rows.slice(start, size), specs))
                  for start, size in ((0, 7), (7, 13), (20, 5), (25, 9)))
    together = predictor.predict([a, b])
    np.testing.assert_allclose(together, np.concatenate([predictor.predict([a]), predictor.predict([b])]), rtol=1e-6)
    cached = [Piece(items=p.items, state=predictor.user_state(p.user)) for p in (a, c)]  # sessions beside fresh users
    mixed = [cached[0], b, cached[1], d]
    alone = np.concatenate([predictor.predict([p]) for p in mixed])
    np.testing.assert_allclose(predictor.predict(mixed), alone, rtol=1e-6)


def test_unknown_ids_read_as_zeros_and_are_counted(trainer, predictor):
    rows = with_user_of(file_rows(trainer, 4), input_specs(trainer.config))
    strange = rows.set_column(rows.schema.get_field_index("C10"), "C10", pa.array(["never-seen"] * 4))

    def counted(batch: pa.RecordBatch) -> tuple[int, int]:
        lookups, misses = predictor.id_counts()
        predictor.predict([_piece(predictor, batch)])
        after = predictor.id_counts()
        return after[0] - lookups, after[1] - misses

    (lookups, misses), (strange_lookups, strange_misses) = counted(rows), counted(strange)
    assert lookups == strange_lookups == 4 * 23 + 4 * 2 + 3  # item ids, C1xC6 and C7_bag, the user once
    assert strange_misses - misses == 4


def test_fusion_formulas_and_their_validation(predictor):
    p = np.array([[0.5, 0.25], [0.1, 0.9]], np.float32)
    np.testing.assert_allclose(fuse(Fusion(kind="product", weights={"ctr": 1.0, "cvr": 0.5}), p, ["ctr", "cvr"]),
                               [0.5 * 0.5, 0.1 * 0.9**0.5], rtol=1e-6)
    np.testing.assert_allclose(fuse(Fusion(kind="sum", weights={"ctr": 2.0}), p, ["ctr", "cvr"]), [1.0, 0.2], rtol=1e-6)
    np.testing.assert_allclose(fuse(Fusion(kind="product"), p, ["ctr", "cvr"]), [0.125, 0.09], rtol=1e-6)
    with pytest.raises(ConfigError, match=r"names \['ltv'\], which are not targets"):
        predictor.set_fusion(Fusion(weights={"ltv": 1.0}))
    with pytest.raises(ConfigError, match="weights"):
        Fusion(weights={"ctr": float("nan")})
    with pytest.raises(ConfigError, match="powers must be >= 0"):
        Fusion(kind="product", weights={"ctr": -1.0})
    assert Fusion(kind="sum", weights={"ctr": -1.0}).weights == {"ctr": -1.0}


def test_sum_fusion_ignores_a_nan_target_when_it_is_left_out_of_the_weights():
    p = np.array([[np.nan, 0.5], [0.2, np.nan]], np.float32)
    for kind in ("sum", "product"):
        np.testing.assert_allclose(fuse(Fusion(kind=kind, weights={"cvr": 1.0}), p[:1], ["ctr", "cvr"]), [0.5])
    np.testing.assert_allclose(fuse(Fusion(kind="sum", weights={"ctr": 2.0, "cvr": 0.0}), p[1:], ["ctr", "cvr"]),
                               [0.4], rtol=1e-6)  # weighted 0: does not count either
    assert np.isnan(fuse(Fusion(kind="sum"), p, ["ctr", "cvr"])).all()  # every target counts: NaN shows


def test_piece_refuses_an_item_column_of_another_length_even_of_one_value(trainer, predictor):
    rows = with_user_of(file_rows(trainer, 3), input_specs(trainer.config))
    columns = _columns(predictor, rows.slice(0, 2))
    with pytest.raises(BatchError, match=r"column 'C9' has 3 values; expected 2 \(one per candidate: an item feature"):
        predictor.piece({**columns, "C9": _columns(predictor, rows)["C9"]}, 2)
    with pytest.raises(BatchError, match=r"column 'C9' has 1 value; expected 2 \(one per candidate: an item feature"):
        predictor.piece({**columns, "C9": columns["C9"].slice(1, 1)}, 2)  # broadcast, it gave wrong scores
    piece = predictor.piece(columns, 2)  # the user's C1, which the item feature C1xC6 reads too: every candidate's
    assert len(columns["C1"]) == 1 and piece.items.column("C1").to_pylist() == [columns["C1"][0].as_py()] * 2


def test_piece_and_user_row_name_the_missing_columns_when_a_request_lacks_them(trainer, predictor):
    rows = with_user_of(file_rows(trainer, 2), input_specs(trainer.config))
    columns = _columns(predictor, rows)
    with pytest.raises(BatchError, match=r"missing item and context columns \['C9'\]"):
        predictor.piece({c: a for c, a in columns.items() if c != "C9"}, 2)
    with pytest.raises(BatchError, match=r"missing user columns \['I1'\]"):
        predictor.piece({c: a for c, a in columns.items() if c != "I1"}, 2)
    with pytest.raises(BatchError, match=r"user columns must hold one value .*'I1': 2"):
        predictor.user_row({**columns, "I1": pa.concat_arrays([columns["I1"]] * 2)})
    state = predictor.user_state(predictor.user_row(columns))  # a session's state stands for the user columns
    items = {c: a for c, a in columns.items() if c in predictor.item_columns and c not in predictor.user_columns}
    assert predictor.piece(items, 2, state).rows == 2


def test_predict_gives_no_rows_when_given_no_pieces(predictor):
    assert predictor.predict([]).shape == (0, 2)


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:x", "meta", 0])
def test_predictor_refuses_a_device_when_it_is_not_auto_cpu_or_cuda(bundle, device):
    with pytest.raises(ConfigError, match=r"Predictor\(device=...\) must be 'auto', 'cpu', 'cuda' or 'cuda:N'.*"
                                          rf"got {device!r}"):
        Predictor(bundle, device=device)


def test_predictor_refuses_a_cuda_device_when_torch_does_not_see_it(bundle):
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match=rf"is '{missing}', but torch sees {torch.cuda.device_count()} CUDA devices"):
        Predictor(bundle, device=missing)
    assert Predictor(bundle, device="auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")


NO_CUDA = not torch.cuda.is_available()
NO_CUDA_REASON = "needs a CUDA device (torch.cuda.is_available() is False)"


@pytest.mark.skipif(NO_CUDA, reason=NO_CUDA_REASON)
def test_the_dense_stage_on_cuda_matches_the_cpu_one(trainer, bundle, predictor):
    from tidal.serving import Batcher

    rows = with_user_of(file_rows(trainer, 300), input_specs(trainer.config))
    on_gpu = Predictor(bundle, device="cuda")
    pieces = [_piece(on_gpu, rows)]
    np.testing.assert_allclose(on_gpu.predict(pieces), predictor.predict(pieces), rtol=1e-4, atol=1e-6)
    batcher = Batcher(on_gpu, max_batch_rows=256, max_delay_ms=1.0, chunk_rows=128, sparse_threads=2,
                      max_queue_rows=10_000)
    try:
        merged = np.concatenate([f.result(timeout=60) for f in batcher.submit(pieces[0])])
    finally:
        batcher.close()
    np.testing.assert_allclose(merged, predictor.predict(pieces), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_bundles_rows_are_pushed_without_another_copy_of_float32_values(dtype):
    """A copy was one more copy of the tables at the peak of every load and reload."""
    from tidal.serving.predictor import _row_block

    keys, values = np.arange(4, dtype=np.int64), np.ones((4, 8), dtype=dtype)
    block = _row_block(keys, values)
    assert block.values.dtype == np.float32 and np.array_equal(block.values, values)
    assert np.shares_memory(block.values, values) == (dtype == np.float32)
