"""Inputs that used to surface as "error: unexpected ..." (our bugs) now get one clear line.

Each case is a thing a user can get wrong: an environment variable, a home folder, an error
whose message spans lines. The hunt that found these (and the ones in other modules) is in the
report of the change that added this file.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest

from tests.helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "1e3"])
def test_bad_thread_count_is_one_line(capsys, monkeypatch, tiny_mixtral, value):
    monkeypatch.setenv("MOE_LOCAL_THREADS", value)
    code, _, err = run_cli(capsys, "generate", str(tiny_mixtral), "Hello", "-n", "2", "--no-chat")
    assert_one_line_error(code, err, "MOE_LOCAL_THREADS", repr(value))
    assert "unexpected" not in err


def test_thread_count_has_a_ceiling(monkeypatch):
    from moe_local import env
    from moe_local.errors import MoeLocalError

    monkeypatch.setenv("MOE_LOCAL_THREADS", "100000")  # torch would start them all and run out of memory
    with pytest.raises(MoeLocalError, match="from 1 to 1024"):
        env.threads()
    monkeypatch.setenv("MOE_LOCAL_THREADS", "1024")
    assert env.threads() == 1024
    monkeypatch.delenv("MOE_LOCAL_THREADS")
    assert env.threads() is None


def test_good_thread_count_is_used(capsys, monkeypatch, tiny_mixtral):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("MOE_LOCAL_THREADS", " 1 ")
    try:
        code, _, err = run_cli(capsys, "generate", str(tiny_mixtral), "Hello", "-n", "2", "--no-chat")
        assert code == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_home_of_an_unknown_user_is_one_line(capsys, monkeypatch, tiny_mixtral):
    monkeypatch.setenv("MOE_LOCAL_HOME", "~no-such-user-here/moe")
    code, _, err = run_cli(capsys, "plan", str(tiny_mixtral))  # the planner reads measured bandwidths
    assert_one_line_error(code, err, "MOE_LOCAL_HOME", "~no-such-user-here")


def test_an_unexpected_error_with_a_long_message_is_still_one_line(capsys, monkeypatch, tiny_mixtral):
    import moe_local.inspection

    def broken(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict:\n\tsize mismatch for w\n" + "x" * 2000)

    monkeypatch.setattr(moe_local.inspection, "inspect_model", broken)
    code, _, err = run_cli(capsys, "inspect", str(tiny_mixtral))
    needle = "unexpected RuntimeError: Error(s) in loading state_dict:; size mismatch"
    assert_one_line_error(code, err, needle)
    assert err.rstrip().endswith("(set MOE_LOCAL_DEBUG=1 for the traceback)") and len(err) < 500


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_output_to_a_full_disk_is_one_line(capsys, monkeypatch, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"step": 0, "layer": 0, "experts": [1, 2]}\n')
    full = open("/dev/full", "w")  # noqa: SIM115  writes fail with ENOSPC, as on a full disk
    monkeypatch.setattr(sys, "stdout", full)
    try:
        code, _, err = run_cli(capsys, "trace", str(trace))
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError):  # its buffer cannot be flushed either
            full.close()
    assert_one_line_error(code, err, "cannot write the output: No space left on device")
