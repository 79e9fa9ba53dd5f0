"""Commands that write a folder never delete what moe-local did not write.

Rule under test (moe_local/convert/outdir.py): OUT is never SRC, never contains SRC, never lies
inside SRC; ``--overwrite`` replaces only a moe-local output (marker or manifest) or an empty
folder; a work folder ``OUT.partial`` is removed only when moe-local made it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_local.convert.outdir import MARKER
from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import MoeLocalError
from moe_local.recipes import load_recipe
from tests.helpers import assert_one_line_error, run_cli


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def src(tiny_mixtral, tmp_path) -> Path:
    """A private copy of the tiny checkpoint inside a parent folder that holds another file."""
    parent = tmp_path / "models"
    parent.mkdir()
    (parent / "notes.txt").write_text("the user's own file\n")
    copy = parent / "mixtral"
    shutil.copytree(tiny_mixtral, copy)
    return copy


@pytest.mark.parametrize("where", ["src", "parent", "inside"])
def test_quantize_never_writes_over_src(src, capsys, where):
    out = {"src": src, "parent": src.parent, "inside": src / "q"}[where]
    before = _tree_digest(src.parent)
    code, _, err = run_cli(capsys, "quantize", str(src), str(out), "--recipe", "tiny-2bit", "--overwrite")
    word = {"src": "is the source", "parent": "contains the source", "inside": "lies inside the source"}
    assert_one_line_error(code, err, word[where])
    assert _tree_digest(src.parent) == before


def test_overwrite_refuses_a_folder_moe_local_did_not_write(src, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    code, _, err = run_cli(capsys, "quantize", str(src), str(out), "--recipe", "tiny-2bit", "--overwrite")
    assert_one_line_error(code, err, "not a moe-local output", "--overwrite")
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8 not ours"


def test_overwrite_replaces_an_empty_folder_and_an_earlier_output(src, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    code, _, err = run_cli(capsys, "quantize", str(src), str(out), "--recipe", "tiny-2bit", "--overwrite")
    assert code == 0, err
    assert (out / "moe_local.json").is_file() and (out / MARKER).is_file()
    assert not (out / "progress").exists()  # a finished folder has no resume state
    code, _, err = run_cli(capsys, "quantize", str(src), str(out), "--recipe", "tiny-2bit", "--overwrite")
    assert code == 0, err
    assert not list(tmp_path.glob(".q.*.old"))  # the replaced output is gone, nothing else


def test_a_partial_folder_that_is_not_ours_is_kept(src, tmp_path, capsys):
    out = tmp_path / "q"
    partial = tmp_path / "q.partial"
    partial.mkdir()
    (partial / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "quantize", str(src), str(out), "--recipe", "tiny-2bit", "--overwrite")
    assert_one_line_error(code, err, "not a moe-local work folder")
    assert (partial / "thesis.tex").read_text() == "years of work"


def test_src_named_like_the_work_folder_is_refused(tiny_mixtral, tmp_path, capsys):
    src = tmp_path / "q.partial"
    shutil.copytree(tiny_mixtral, src)
    before = _tree_digest(src)
    code, _, err = run_cli(capsys, "quantize", str(src), str(tmp_path / "q"), "--overwrite")
    assert_one_line_error(code, err, "OUT.partial", "is the source")
    assert _tree_digest(src) == before


def test_gptq_export_follows_the_same_rule(src, tmp_path, capsys):
    before = _tree_digest(src.parent)
    for out in (src, src.parent):
        code, _, err = run_cli(capsys, "quantize", str(src), str(out), "--format", "gptq", "--overwrite")
        assert_one_line_error(code, err, "source")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    code, _, err = run_cli(capsys, "quantize", str(src), str(mine), "--format", "gptq", "--overwrite")
    assert_one_line_error(code, err, "not a moe-local output")
    assert _tree_digest(src.parent) == before and (mine / "keep.txt").exists()
    out = tmp_path / "g"
    code, _, err = run_cli(capsys, "quantize", str(src), str(out), "--format", "gptq", "--group-size", "16")
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "quantize", str(src), str(out), "--format", "gptq", "--group-size", "16", "--overwrite"
    )
    assert code == 0, err  # its own earlier export carries the marker


def test_synth_follows_the_same_rule(src, tmp_path, capsys):
    before = _tree_digest(src.parent)
    config = str(src / "config.json")
    code, _, err = run_cli(capsys, "synth", str(src), "--like", config, "--format", "hf", "--overwrite")
    assert_one_line_error(code, err, "is the source")
    code, _, err = run_cli(capsys, "synth", str(src.parent), "--like", config, "--overwrite")
    assert_one_line_error(code, err, "contains the source")
    assert _tree_digest(src.parent) == before
    out = tmp_path / "s"
    code, _, err = run_cli(capsys, "synth", str(out), "--like", config, "--format", "hf")
    assert code == 0, err
    code, _, err = run_cli(capsys, "synth", str(out), "--like", config, "--overwrite")
    assert code == 0, err


def test_offload_dir_inside_the_model_is_refused(src, capsys):
    before = _tree_digest(src)
    code, _, err = run_cli(capsys, "generate", str(src), "hi", "-n", "2", "--offload-dir", str(src))
    assert_one_line_error(code, err, "--offload-dir", "lies inside the source")
    assert _tree_digest(src) == before


def test_library_api_follows_the_rule(src):
    with pytest.raises(MoeLocalError, match="is the source"):
        quantize_checkpoint(src, src, load_recipe("tiny-2bit"), overwrite=True)
    with pytest.raises(MoeLocalError, match="is the source"):
        quantize_checkpoint(src, src, load_recipe("tiny-2bit"), dry_run=True)


def test_out_under_proc_is_one_line(src, capsys):
    code, _, err = run_cli(capsys, "quantize", str(src), "/proc/moe-local-out", "--recipe", "tiny-2bit")
    assert_one_line_error(code, err, "/proc/moe-local-out")
    assert "unexpected" not in err


def test_a_full_disk_is_one_line_and_keeps_the_work_for_resume(src, tmp_path):
    # RLIMIT_FSIZE makes every write past 64 KiB fail as a full disk would (EFBIG; Python ignores
    # SIGXFSZ), through the real CLI in a child process.
    out = tmp_path / "q"
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
        "from moe_local.cli import main; sys.argv = ['moe-local'] + sys.argv[1:]; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "quantize", str(src), str(out), "--recipe", "tiny-2bit"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [
        ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.lstrip().startswith(("━", "dense"))
    ]
    assert proc.returncode != 0
    assert lines[-1].startswith("error: ") and "too large" in lines[-1].lower(), proc.stderr
    assert "unexpected" not in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
