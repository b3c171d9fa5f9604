"""The BPF object cache: an object is reused only while everything it was built from
is unchanged, the shared header included."""

from __future__ import annotations

from pathlib import Path

from fastpath.xdp import build, steer


def test_digest_follows_the_source_and_the_headers_beside_it(tmp_path: Path) -> None:
    source = tmp_path / "prog.bpf.c"
    header = tmp_path / "shared.h"
    source.write_text('#include "shared.h"\nint x;\n')
    header.write_text("#define A 1\n")
    first = build.source_digest(str(source))
    assert build.source_digest(str(source)) == first  # deterministic
    header.write_text("#define A 2\n")
    second = build.source_digest(str(source))
    assert second != first
    source.write_text('#include "shared.h"\nint y;\n')
    assert build.source_digest(str(source)) not in (first, second)
    (tmp_path / "other.txt").write_text("not a header")
    assert build.source_digest(str(source)) == build.source_digest(str(source))


def test_both_programs_share_the_verdict_header() -> None:
    header = Path(build.SOURCE).with_name("verdicts.h")
    for source in (build.SOURCE, steer.SOURCE):
        text = Path(source).read_text()
        assert '#include "verdicts.h"' in text and "VERDICT_MAP(" in text
        assert "verdicts, &reason" not in text  # one counting helper: the header's
    assert "count_verdict" in header.read_text()
