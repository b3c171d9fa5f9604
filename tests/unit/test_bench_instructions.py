"""bench.instructions: its requests and loop run against this tree (valgrind aside)."""

import os
import pickle
import subprocess
import sys

import msgpack

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
