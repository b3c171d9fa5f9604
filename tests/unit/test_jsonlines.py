"""bench.jsonlines.serve: one reply line per command, bad commands answered, never fatal."""

from __future__ import annotations

import io
import json

from bench.jsonlines import serve


def _run(lines, max_commands=100):
    seen = []

    def handle(cmd: dict) -> dict:
        seen.append(cmd)
        if cmd.get("cmd") == "boom":
            raise KeyError("missing")
        return {"echo": cmd.get("x")}

    out = io.StringIO()
    serve(handle, max_commands, io.StringIO("".join(line + "\n" for line in lines)), out)
    return [json.loads(line) for line in out.getvalue().splitlines()], seen


def test_replies_errors_and_quit():
    replies, seen = _run(['{"cmd": "a", "x": 1}', "not json", "[1, 2]", '{"cmd": "boom"}',
                          '{"cmd": "quit"}', '{"cmd": "after quit"}'])
    assert replies[0] == {"ok": True, "echo": 1}
    assert replies[1]["ok"] is False and replies[1]["error"].startswith("JSONDecodeError")
    assert replies[2] == {"ok": False, "error": "ValueError: a command is a JSON object "
                                               "with a 'cmd' key"}
    assert replies[3]["ok"] is False and "KeyError" in replies[3]["error"]
    assert replies[4] == {"ok": True}
    assert len(replies) == 5  # nothing after quit is read
    assert [c["cmd"] for c in seen] == ["a", "boom"]


def test_bounded_and_eof():
    replies, _ = _run(['{"cmd": "a"}'] * 5, max_commands=3)
    assert len(replies) == 3
    replies, _ = _run([])
    assert replies == []


def test_emit_prints_the_result_and_writes_the_same_json(tmp_path, capsys):
    import json

    from bench import jsonlines

    out = tmp_path / "r.json"
    jsonlines.emit({"rate": 5, "ok": True}, str(out))
    printed = capsys.readouterr().out
    assert json.loads(printed) == {"rate": 5, "ok": True} == json.loads(out.read_text())
    jsonlines.emit({"x": 1}, None)  # printed only
    assert json.loads(capsys.readouterr().out) == {"x": 1}
