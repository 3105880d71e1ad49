"""benchmarks/perf_profile.py's reading of ``perf script`` output (no perf needed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from perf_profile import stacks_of, summarize

SCRIPT = """
\tffffffff82265fc4 tcp_sendmsg
\tffffffff81000130 entry_SYSCALL_64_after_hwframe
\t           f838f __GI___libc_write
\t           c76dc __pyx_pw_6uvloop_4loop_8UVStream_5write
\t          158cc7 _PyObject_VectorcallTstate (inlined)
\t          158cc7 PyObject_VectorcallMethod
\t           92115 CPyDef_session___Session____known_query
\t           934ab CPyDef_session___Session___client_data
\t           95901 CPyPy_session___Session___client_data

\t          250a3f _PyEval_EvalFrameDefault
\t          250a3f _PyEval_Vector
\t          15b1d3 method_vectorcall
\t           92115 CPyDef_session___Session____known_query
\t           934ab CPyDef_session___Session___client_data

\t           11111 uv__io_poll
"""


def test_samples_are_split_on_blank_lines_leaf_first() -> None:
    stacks = stacks_of(SCRIPT)
    assert len(stacks) == 3
    assert stacks[0][:2] == ["tcp_sendmsg", "entry_SYSCALL_64_after_hwframe"]
    assert stacks[1][-1] == "CPyDef_session___Session___client_data"
    assert stacks[2] == ["uv__io_poll"]


def test_each_compiled_function_gets_its_inclusive_share_and_direct_callees() -> None:
    text = summarize(stacks_of(SCRIPT))
    lines = text.splitlines()
    assert lines[0] == "samples: 3 (in the kernel: 33.3%)"
    # Two of three samples are in client_data and in _known_query (each counted once).
    assert " 66.7%  session___Session___client_data" in lines
    assert " 66.7%  session___Session____known_query" in lines
    at = lines.index(" 66.7%  session___Session____known_query")
    callees = lines[at + 1 : at + 3]
    # Call wrappers (PyObject_VectorcallMethod, method_vectorcall) are looked through.
    assert "           33.3%  __pyx_pw_6uvloop_4loop_8UVStream_5write" in callees
    assert "           33.3%  _PyEval_Vector" in callees
    client = lines.index(" 66.7%  session___Session___client_data")
    assert lines[client + 1] == "           66.7%  session___Session____known_query"
