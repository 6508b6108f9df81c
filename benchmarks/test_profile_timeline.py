"""The timeline analysis of `profile_losses.py --timeline` on a hand-made trace: busy time, gaps, host ops."""

from __future__ import annotations

from benchmarks.profile_losses import timeline


def _event(cat: str, name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_timeline_reports_busy_time_and_the_host_ops_of_each_idle_gap():
    trace = {"traceEvents": [
        _event("cpu_op", "aten::copy_", 0, 20),
        _event("kernel", "copy_kernel", 5, 10),
        _event("kernel", "overlapping", 12, 8),  # merges with the first: busy 5-20
        _event("cpu_op", "aten::_local_scalar_dense", 20, 50),
        _event("cuda_runtime", "cudaGraphLaunch", 70, 5),
        _event("kernel", "graph_kernel", 74, 100),
        _event("kernel", "tiny_gap_after", 178, 2),  # a 4 us gap is not reported
    ]}
    lines = timeline(trace)
    assert "wall 180 us, device busy 117 us" in lines[0]
    gaps = [line.split() for line in lines[1:]]
    assert [g[:2] for g in gaps] == [["20", "54"]]  # 0-5 and 174-178 are below 10 us
    assert "aten::_local_scalar_dense" in lines[1] and "cudaGraphLaunch" in lines[1]


def test_timeline_without_device_events_says_so():
    assert "no device events" in timeline({"traceEvents": [_event("cpu_op", "aten::add", 0, 3)]})[0]
