"""`tidal bench sparse` on a tiny workload: it runs both peers and reports every figure."""

from __future__ import annotations

import json

import pytest

from tidal.bench.sparse import SparseBenchConfig, run
from tidal.cli import main

TINY = SparseBenchConfig(warm_rows=5_000, dim=8, batch_size=64, features=4, steps=2, warmup_steps=1)
FIELDS = {"optimizer", "threads", "tidal_ids_per_s", "torch_ids_per_s", "ratio_vs_torch", "fbgemm_ids_per_s",
          "ratio_vs_fbgemm", "tidal_gb_per_s", "memcpy_gb_per_s", "bytes_per_row"}


def test_summary_has_every_field_for_every_run(capsys):
    summary = run(TINY, as_json=True, threads=[1, 2], optimizers=("sgd", "adagrad"))
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads(json.dumps(summary))
    assert FIELDS <= set(summary)
    assert [(r["optimizer"], r["threads"]) for r in summary["runs"]] == [("sgd", 1), ("sgd", 2), ("adagrad", 1), ("adagrad", 2)]
    assert (summary["optimizer"], summary["threads"]) == ("sgd", 2)
    for r in summary["runs"]:
        assert r["tidal_ids_per_s"] > 0 and r["torch_ids_per_s"] > 0 and r["memcpy_gb_per_s"] > 0
        assert r["table_rows"] >= TINY.warm_rows
        assert 0 < r["bytes_per_row"] < 10_000
    assert isinstance(summary["targets_met"], bool)
    assert isinstance(summary["freed_memory_kept"], bool)


def test_freed_memory_is_kept_for_the_next_step():
    import platform
    import resource

    import numpy as np

    from tidal.bench.sparse import keep_freed_memory

    if platform.libc_ver()[0] != "glibc":
        assert keep_freed_memory() is False
        return
    assert keep_freed_memory() is True
    faults = []
    for _ in range(4):  # a step's buffers, allocated, written and freed together, again and again
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [np.ones(24 << 20, dtype=np.uint8) for _ in range(3)]
        del buffers
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert max(faults[1:]) < 100, faults  # handed back to the kernel each time: about 1,500 a step here


@pytest.mark.parametrize("threads", [["0"], ["1", "100000"]])
def test_cli_refuses_bad_thread_count(capsys, threads):
    assert main(["bench", "sparse", "--threads", *threads]) == 2
    assert f"--threads must be 1 to 256, got [{', '.join(threads)}]" in capsys.readouterr().err


def test_a_setting_given_twice_is_measured_once(monkeypatch):
    """`--threads 1 1` measured the same thing twice, for twice the time (an audit's find)."""
    from tidal.bench import sparse

    runs = []
    monkeypatch.setattr(sparse, "run", lambda cfg, **kwargs: runs.append(kwargs))
    assert main(["bench", "sparse", "--quick", "--threads", "2", "1", "2", "--optimizer", "sgd", "sgd"]) == 0
    assert runs[0]["threads"] == [2, 1] and runs[0]["optimizers"] == ("sgd",)


def test_peers_take_turns_in_blocks_each_round_led_by_the_next_and_the_first_step_of_a_turn_is_not_timed():
    import time

    from tidal.bench.sparse import _median_step_s

    order = []

    def step(name):
        def run_one(batch):
            slow = bool(order) and order[-1][0] != name  # right after the other peer: pays for it
            order.append((name, batch))
            time.sleep(0.03 if slow else 0.001)
        return run_one

    medians = _median_step_s({"a": step("a"), "b": step("b"), "c": step("c")}, list(range(10)), warmup=0, block=4)
    round_ = lambda names, batches: [(name, n) for name in names for n in batches]  # noqa: E731
    assert order == round_("abc", range(4)) + round_("bca", range(4, 8)) + round_("cab", range(8, 10))
    assert medians["a"] < 0.01 and medians["b"] < 0.01 and medians["c"] < 0.01


def test_figures_follow_from_the_step_times(monkeypatch):
    """Step times of 1, 2 and 4 s give these figures, the right way round."""
    from tidal.bench import sparse

    monkeypatch.setattr(sparse, "_median_step_s", lambda steps, batches, warmup: {"tidal": 1.0, "torch": 2.0, "fbgemm": 4.0})
    monkeypatch.setattr(sparse, "_fbgemm", lambda cfg, optimizer, grad: lambda batch: None)
    r = sparse.run_one(TINY, "sgd", 1, memcpy=10.0)
    ids = TINY.batch_size * TINY.features
    assert (r["tidal_ids_per_s"], r["torch_ids_per_s"], r["fbgemm_ids_per_s"]) == (ids, ids / 2, ids / 4)
    assert (r["ratio_vs_torch"], r["ratio_vs_fbgemm"]) == (2.0, 4.0)


def test_targets_are_met_only_when_every_run_meets_all_three():
    from tidal.bench.sparse import _targets_met

    def run_of(optimizer, ratio, overhead):
        return {"optimizer": optimizer, "ratio_vs_torch": ratio, "bytes_per_row": overhead}

    assert _targets_met([run_of("sgd", 2.0, 24.0), run_of("adagrad", 1.5, 24.0)])
    assert not _targets_met([run_of("sgd", 1.99, 20.0), run_of("adagrad", 3.0, 20.0)])
    assert not _targets_met([run_of("sgd", 2.5, 20.0), run_of("adagrad", 1.49, 20.0)])
    assert not _targets_met([run_of("sgd", 2.5, 24.1), run_of("adagrad", 2.0, 20.0)])


def test_zipf_ranks_follow_zipf_over_the_key_space_not_a_fold_of_numpys_unbounded_draws():
    import numpy as np

    from tidal.bench.sparse import zipf_ranks

    space, a = 100, 1.1
    ranks = zipf_ranks(np.random.default_rng(0), a, 400_000, space)
    assert ranks.min() >= 0 and ranks.max() < space
    expected = np.arange(1, space + 1) ** -a
    expected /= expected.sum()
    observed = np.bincount(ranks, minlength=space) / ranks.size
    # a fold would spread the 59% of numpy's draws beyond 100 over the space: rank 99 at 0.70%, not 0.15%
    np.testing.assert_allclose(observed, expected, atol=0.003)
    again = zipf_ranks(np.random.default_rng(0), a, 400_000, space)
    assert np.array_equal(ranks, again)  # a seed gives the same batches


def test_memcpy_counts_the_bytes_read_and_written_as_the_step_figure_does(monkeypatch):
    from tidal.bench import sparse

    clock = iter([10.0, 12.0])
    monkeypatch.setattr(sparse.time, "perf_counter", lambda: next(clock))
    assert sparse.memcpy_gb_per_s(size_bytes=1 << 20, repeats=3) == 2 * (1 << 20) * 3 / 2.0 / 1e9


@pytest.mark.parametrize(("share", "warned"), [(0.3, False), (0.73, True), (None, False)])
def test_a_benchmark_on_a_busy_machine_says_so_first(capsys, monkeypatch, share, warned):
    from tidal import cli
    from tidal.bench import sparse

    monkeypatch.setattr(cli, "busy_share", lambda: share)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(sparse, "run", lambda *args, **kwargs: print("ran"))
    assert main(["bench", "sparse", "--quick"]) == 0
    out, err = capsys.readouterr()
    assert out == "ran\n"
    assert (err == "tidal bench sparse: the machine is busy (other work used 73% of its 2 cores' time over the last "
                   "half second): it slows the peers unevenly; compare figures from a quiet machine\n") == warned
    assert (err == "") != warned


def test_the_busy_share_is_what_the_cores_spent_on_anything_but_idling(monkeypatch, machine_taken_as_quiet):
    from tidal import cli

    busy_share = machine_taken_as_quiet  # the real one
    assert 0.0 <= busy_share(seconds=0.05) <= 1.0  # this machine's own
    times = iter([[100, 0, 50, 800, 50, 0, 0, 0], [160, 0, 70, 900, 70, 0, 0, 100]])  # user, nice, system, idle, ...
    monkeypatch.setattr(cli, "_cpu_times", lambda: next(times))
    assert busy_share(seconds=0) == pytest.approx(1 - 120 / 300)  # stolen time counts busy
