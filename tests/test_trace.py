"""--trace: the tracer itself, and a real ps-local job whose every process writes a valid
Chrome trace with the expected spans, merged into one file; ps-plot draws the job."""
import json
import subprocess
import sys
import time

import pytest

from common.trace import NULL_TRACER, Tracer, merge_traces, read_trace, trace_file
from tests.cluster import ENV

SMALL = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8",
         "--eval-interval", "10", "--eval-batches", "2", "--sample-bytes", "20", "--timeout", "30"]
WORKER_SPANS = {"init", "pull", "forward", "backward", "push", "wait", "step", "evaluate"}
SERVER_SPANS = {"store push", "wait for pushes", "average", "norm exchange", "update", "reply"}


def test_tracer_records_spans_on_the_wall_clock(tmp_path):
    tracer = Tracer("worker 3", pid=42)
    before = time.time() * 1e6
    with tracer.span("outer", step=1):
        with tracer.span("inner"):
            time.sleep(0.01)
    t0 = tracer.now()
    tracer.add("by hand", t0, t0 + 5.0, worker=2)
    after = time.time() * 1e6
    path = tracer.save(trace_file(tmp_path, "worker", 3))
    assert path.name == "trace-worker-3.json"
    data = json.loads(path.read_text())
    names = [e for e in data["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    assert names[0]["args"]["name"] == "worker 3"
    spans = {e["name"]: e for e in read_trace(path)}
    assert set(spans) == {"outer", "inner", "by hand"}
    outer, inner = spans["outer"], spans["inner"]
    assert before - 2e3 <= outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + 1
    assert inner["dur"] >= 9e3 and outer["ts"] + outer["dur"] <= after + 2e3        # microseconds
    assert outer["args"] == {"step": 1} and spans["by hand"]["dur"] == 5.0 and spans["inner"]["pid"] == 42
    assert all(e["process"] == "worker 3" for e in spans.values())


def test_the_null_tracer_records_nothing():
    with NULL_TRACER.span("x"):
        pass
    NULL_TRACER.add("y", 0, 1)
    assert NULL_TRACER.enabled is False and NULL_TRACER.save("/nonexistent/x.json") is None
    assert not hasattr(NULL_TRACER, "events")


def test_merge_renumbers_processes(tmp_path):
    for role, rank in [("worker", 0), ("server", 1), ("server", 0)]:
        t = Tracer(f"{role} {rank}", pid=7)                 # the same pid on "different machines"
        with t.span("work"):
            pass
        t.save(trace_file(tmp_path, role, rank))
    merged = json.loads(merge_traces(tmp_path).read_text())
    procs = {e["pid"]: e["args"]["name"] for e in merged["traceEvents"] if e["name"] == "process_name"}
    assert procs == {1: "server 0", 2: "server 1", 3: "worker 0"}
    (tmp_path / "empty").mkdir()
    assert merge_traces(tmp_path / "empty") is None


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("traced") / "run"
    done = subprocess.run([sys.executable, "-m", "common.launch.local", "--servers", "2", "--workers", "2",
                           "--steps", "30", "--out", str(out), "--no-progress", "--trace", *SMALL],
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ui.perfetto.dev" in done.stdout
    return out


def test_every_process_writes_a_trace_with_its_spans(traced_run):
    for role, rank, expected in [("server", 0, SERVER_SPANS), ("server", 1, SERVER_SPANS),
                                 ("worker", 0, WORKER_SPANS), ("worker", 1, WORKER_SPANS - {"init", "evaluate"})]:
        events = read_trace(trace_file(traced_run, role, rank))
        names = {e["name"] for e in events}
        assert expected <= names, (role, rank, expected - names)
        assert {e["process"] for e in events} == {f"{role} {rank}"}
        steps = sorted(e["args"]["step"] for e in events if e["name"] == ("step" if role == "worker" else "update"))
        assert steps == list(range(30)), (role, rank)
    merged = read_trace(traced_run / "trace.json")
    assert len({e["pid"] for e in merged}) == 4
    # one clock: every server's update of step 10 STARTS between the workers' first push and last pull
    # of step 10. Both are causal orders the design guarantees: a server updates only once the pushes
    # of the step are in (paramserver/steps.py, _finish after the agreement), and a worker's pull of
    # step 10 ends with an answer the server sent after it began the update. The END of an update span
    # is not ordered with the pulls: chunk by chunk, the answers stream out inside the span
    # (SyncServing._update_chunks), so a worker may have its last chunk before the span closes.
    push_start = min(e["ts"] for e in merged if e["name"] == "push" and e["args"]["step"] == 10)
    pull_end = max(e["ts"] + e["dur"] for e in merged if e["name"] == "pull" and e["args"]["step"] == 10)
    updates = [e for e in merged if e["name"] == "update" and e["args"]["step"] == 10]
    assert len(updates) == 2
    for e in updates:                          # 1 ms: time.time() read by different processes of one host
        assert push_start - 1e3 <= e["ts"] <= pull_end + 1e3, (push_start, e["ts"], pull_end)

def test_ps_plot_draws_the_metrics_and_the_timeline(traced_run):
    for args, png in [([], "plot.png"), (["--timeline"], "timeline.png"), (["--timeline", "--steps", "3:5"], "t.png")]:
        extra = ["--out", str(traced_run / png)] if png == "t.png" else []
        done = subprocess.run([sys.executable, "-m", "common.plot", str(traced_run), *args, *extra], env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert (traced_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
