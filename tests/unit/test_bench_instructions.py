"""bench.instructions: its requests and loop run against this tree (valgrind aside)."""

import os
import pickle
import subprocess
import sys

import msgpack
import pytest

from bench import instructions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_requests_are_one_call_each_offer_answer_delete():
    calls = instructions.requests(2)
    assert [[msgpack.unpackb(d)["cmd"] for d in c] for c in calls] == [
        ["offer", "answer", "delete"]] * 2
    assert msgpack.unpackb(calls[1][0])["call_id"] == "bench-1"


def test_the_loop_runs_every_call_on_this_tree(tmp_path):
    script, data = tmp_path / "loop.py", tmp_path / "calls.pickle"
    script.write_text(instructions.LOOP + "\nassert not engine.by_call\n"
                      "print(engine.counters['sessions.deleted'])\n")
    data.write_bytes(pickle.dumps(instructions.requests(5)))
    out = subprocess.run([sys.executable, str(script), "2", "3", str(data)], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.split() == ["5"]  # every call set up and deleted, none failed


SUMMARY = """==1== I   refs:      2,509,143,887
==1== D1  misses:       24,886,933  ( 21,073,606 rd   +   3,813,327 wr)
==1== LL misses:         1,204,551  (    700,103 rd   +     504,448 wr)
==1== Branches:        432,701,351  (401,227,588 cond +  31,473,763 ind)
==1== Mispredicts:      49,529,191  ( 34,318,387 cond +  15,210,804 ind)
"""


def test_daemon_figures_come_from_cachegrinds_summary():
    assert instructions.figures(SUMMARY) == {
        "instructions": 2509143887, "d1_misses": 24886933, "ll_misses": 1204551,
        "branches": 432701351,
        "mispredicts": 49529191, "indirect_mispredicts": 15210804}


def test_daemon_per_call_is_the_difference_over_the_calls(monkeypatch, tmp_path):
    base = instructions.figures(SUMMARY)
    runs = {0: {"daemon": base, "worker": base},
            1000: {"daemon": {k: v + 1000 * 7 for k, v in base.items()},
                   "worker": {k: v + 1000 * 2 for k, v in base.items()}}}
    monkeypatch.setattr(instructions, "daemon_run", lambda py, tree, calls, tmp: runs[calls])
    per = instructions.daemon_per_call("python", "tree", 1000, str(tmp_path))
    assert per == {"daemon": dict.fromkeys(instructions._DAEMON_FIGURES, 7),
                   "worker": dict.fromkeys(instructions._DAEMON_FIGURES, 2),
                   "total": dict.fromkeys(instructions._DAEMON_FIGURES, 9)}


def test_each_log_is_named_by_the_process_it_records():
    daemon = "==7== Command: /usr/bin/python3 -m lrk run --mode socket\n" + SUMMARY
    worker = ("==9== Command: /usr/bin/python3 -m fastpath.worker.loop --channel-fd 5\n"
              + SUMMARY.replace("2,509,143,887", "11"))
    out = instructions.by_process([worker, daemon])
    assert out["daemon"]["instructions"] == 2509143887
    assert out["worker"]["instructions"] == 11
    with pytest.raises(SystemExit, match="not a daemon and its worker"):
        instructions.by_process([daemon])
    with pytest.raises(SystemExit, match="two worker processes"):
        instructions.by_process([worker, worker, daemon])
