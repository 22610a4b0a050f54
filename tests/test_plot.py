"""ps-plot on run folders written here: which panels it draws from which files, overlays,
and errors a person can act on. (The end-to-end drawing of a real job is in test_trace.py.)"""
import json

import pytest

from common import plot

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, records, servers=None):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for s, hist in (servers or {}).items():
        (folder / f"server-{s}.json").write_text(json.dumps({"staleness": hist}))
    return folder


def distributed_records(n=6, stale=False):
    recs = [{"step": 0, "val_loss": 5.5, "workers": 2}]
    for k in range(1, n + 1):
        r = {"step": 5 * k, "loss": 5.0 - 0.3 * k, "tokens_per_s": 1000.0 + k, "elapsed_s": 0.5 * k,
             "bytes_pushed": 100 * k, "bytes_pulled": 100 * k}
        if k % 2 == 0:
            r["val_loss"] = 5.1 - 0.3 * k
        if stale:
            r.update(staleness_mean=0.5, staleness_max=2)
        recs.append(r)
    return recs


def test_series_reads_what_is_there():
    recs = distributed_records()
    xs, ys = plot.series(recs, "val_loss")
    assert xs == [0, 10, 20, 30] and ys == pytest.approx([5.5, 4.5, 3.9, 3.3])
    xs, _ = plot.series(recs, "val_loss", "elapsed_s")
    assert xs == [0.0, 1.0, 2.0, 3.0]                    # step 0 is at 0 s
    assert plot.series(recs, "staleness_mean") == ([], [])


def test_staleness_histograms_are_summed_over_servers(tmp_path):
    run = write_run(tmp_path / "r", distributed_records(), {0: {"0": 5, "2": 1}, 1: [3, 4]})
    assert plot.read_staleness(run) == {0: 8, 1: 4, 2: 1}
    assert plot.read_staleness(tmp_path) == {}


def test_one_run_and_overlays_are_drawn(tmp_path):
    a = write_run(tmp_path / "a", distributed_records())
    b = write_run(tmp_path / "b", distributed_records(stale=True), {0: {"0": 9, "1": 2}})
    single = write_run(tmp_path / "x" / "a", [{"step": 0, "val_loss": 5.5},
                                              {"step": 10, "loss": 4.0, "elapsed_s": 1.0, "tokens_per_s": 9.0}])
    for runs, out in [([a], a / "plot.png"), ([a, b, single], tmp_path / "cmp.png")]:
        assert plot.plot_runs(runs, out) == out and out.read_bytes()[:8] == PNG
    labels = plot.run_labels([a, single, b])
    assert labels[0] == f"{tmp_path.name}/a" and labels[1:] == ["x/a", "b"]    # names alike: parent/name


def test_the_command_writes_its_default_file_and_refuses_bad_folders(tmp_path, capsys):
    a = write_run(tmp_path / "a", distributed_records())
    assert plot.main([str(a)]) == 0 and (a / "plot.png").read_bytes()[:8] == PNG
    assert "wrote" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert plot.main([str(tmp_path / "empty")]) == 1
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    assert plot.main([str(a), "--timeline"]) == 1
    assert "run with --trace" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "missing")])
