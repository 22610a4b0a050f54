"""ps-plot on run folders written here: which panels it draws from which files, overlays,
and errors a person can act on. The servers' files are written by the servers' own
``Recorder`` (paramserver/modes.py), so a change of their format fails here.
(The end-to-end drawing of a real job is in test_trace.py.)"""
import json

import pytest

from common import plot
from paramserver.modes import Recorder

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, records, servers=None):
    """A run folder: ``records`` as metrics.jsonl, and for each server S of ``servers``
    (S -> a list of (version staleness, clock staleness) of applied asp pushes, or
    "bsp" for 3 synchronous steps of 2 workers) the server-S.json its Recorder writes."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for s, pushes in (servers or {}).items():
        rec = Recorder("bsp" if pushes == "bsp" else "asp", 2)
        if pushes == "bsp":
            for v in range(3):
                rec.step([0, 1], v)
        else:
            for i, (stale, clock_stale) in enumerate(pushes):
                rec.push(i % 2, i // 2, 10 + i - stale, 10 + i, clock_stale)
        rec.write(str(folder), f"server-{s}.json", 10 + len(pushes))
    return folder


def distributed_records(n=6):
    recs = [{"step": 0, "val_loss": 5.5, "workers": 2}]
    for k in range(1, n + 1):
        r = {"step": 5 * k, "loss": 5.0 - 0.3 * k, "tokens_per_s": 1000.0 + k, "elapsed_s": 0.5 * k,
             "bytes_pushed": 100 * k, "bytes_pulled": 100 * k}
        if k % 2 == 0:
            r["val_loss"] = 5.1 - 0.3 * k
        recs.append(r)
    return recs


def test_series_reads_what_is_there():
    recs = plot.with_wire(distributed_records())
    xs, ys = plot.series(recs, "val_loss")
    assert xs == [0, 10, 20, 30] and ys == pytest.approx([5.5, 4.5, 3.9, 3.3])
    xs, _ = plot.series(recs, "val_loss", "elapsed_s")
    assert xs == [0.0, 1.0, 2.0, 3.0]                    # step 0 is at 0 s
    xs, _ = plot.series(recs, "val_loss", "wire_mb")
    assert xs == pytest.approx([0.0, 400e-6, 800e-6, 1200e-6])   # and at 0 bytes
    xs, _ = plot.series(recs, "val_loss", "pushed_mb")
    assert xs == pytest.approx([0.0, 200e-6, 400e-6, 600e-6])    # the pushes alone
    assert plot.series(recs, "tokens_per_s", "nothing") == ([], [])


def test_staleness_is_read_from_the_servers_files_and_summed_over_servers(tmp_path):
    run = write_run(tmp_path / "r", distributed_records(), {0: [(0, 0), (2, 5), (0, 1)], 1: [(1, 0), (0, 5)]})
    assert json.loads((run / "server-0.json").read_text())["staleness_hist"] == {"0": 2, "2": 1}   # the real file
    assert plot.read_staleness(run) == {0: 3, 1: 1, 2: 1}
    assert plot.read_staleness(run, "clock_staleness_hist") == {0: 2, 1: 1, 5: 2}
    bsp = write_run(tmp_path / "bsp", distributed_records(), {0: "bsp"})
    assert plot.read_staleness(bsp) == {0: 6} and plot.read_staleness(bsp, "clock_staleness_hist") == {}
    assert plot.read_staleness(tmp_path) == {}                       # no server file: no histogram
    with pytest.raises(ValueError, match="draws"):
        plot.read_staleness(run, "staleness")


def test_one_run_and_overlays_are_drawn(tmp_path):
    a = write_run(tmp_path / "a", distributed_records(), {0: "bsp"})
    b = write_run(tmp_path / "b", distributed_records(), {0: [(0, 0), (1, 2)], 1: [(3, 30), (0, 0)]})
    single = write_run(tmp_path / "x" / "a", [{"step": 0, "val_loss": 5.5},
                                              {"step": 10, "loss": 4.0, "elapsed_s": 1.0, "tokens_per_s": 9.0}])
    for runs, out, against in [([a], a / "plot.png", ("step", "time")), ([a, b, single], tmp_path / "cmp.png",
                                                                          ("step", "time")),
                               ([a, b], tmp_path / "bytes.png", ("step", "bytes")),
                               ([a, b], tmp_path / "pushed.png", ("step", "pushed", "bytes"))]:
        assert plot.plot_runs(runs, out, against=against) == out and out.read_bytes()[:8] == PNG
    labels = plot.run_labels([a, single, b])
    assert labels[0] == f"{tmp_path.name}/a" and labels[1:] == ["x/a", "b"]    # names alike: parent/name
    with pytest.raises(ValueError, match="no run records bytes"):
        plot.plot_runs([single], tmp_path / "n.png", against=("bytes",))
    with pytest.raises(ValueError, match="pushed: no run records bytes"):
        plot.plot_runs([single], tmp_path / "n.png", against=("step", "pushed"))
    with pytest.raises(ValueError, match="choose from"):
        plot.plot_runs([a], tmp_path / "n.png", against=("steps",))


def test_the_panels_follow_what_the_runs_hold(tmp_path, monkeypatch):
    """Which panels a figure gets: the staleness ones only from server files that hold them."""
    import matplotlib.figure
    titles = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (titles.append(
        [ax.get_title() for ax in fig.axes if ax.get_visible()]), real(fig, *a, **k))[1])
    bsp = write_run(tmp_path / "bsp", distributed_records(), {0: "bsp"})
    asp = write_run(tmp_path / "asp", distributed_records(), {0: [(0, 0), (1, 25), (4, 3)]})
    plot.plot_runs([bsp], tmp_path / "1.png")
    plot.plot_runs([bsp, asp], tmp_path / "2.png", against=("bytes",))
    short = [[t.split(" (")[0] for t in fig] for fig in titles]
    assert short[0] == ["loss", "loss", "tokens per second", "bytes on the wire, pushed + pulled"]   # staleness 0 only
    assert short[1] == ["validation loss", "tokens per second", "bytes on the wire, pushed + pulled",
                        "staleness of the applied updates", "clock staleness, asp/ssp"]
    assert titles[1][-1] == "clock staleness, asp/ssp (cumulative share)"      # 25 clocks: drawn cumulative


def test_the_command_writes_its_default_file_and_refuses_bad_folders(tmp_path, capsys):
    a = write_run(tmp_path / "a", distributed_records())
    assert plot.main([str(a)]) == 0 and (a / "plot.png").read_bytes()[:8] == PNG
    assert "wrote" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert plot.main([str(tmp_path / "empty")]) == 1
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    assert plot.main([str(a), "--against", "step,wall"]) == 1
    assert "choose from step, time, bytes" in capsys.readouterr().err
    assert plot.main([str(a), "--timeline"]) == 1
    assert "run with --trace" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "missing")])
