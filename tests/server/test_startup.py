"""Starting the server: a model that cannot load stops it with one clear error line."""

from __future__ import annotations

import subprocess
import sys

from tests.server.harness import free_port


def test_unloadable_model_stops_the_server_with_an_error(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_local.server",
            str(missing),
            "--port",
            str(free_port()),
            "--log-level",
            "critical",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot load")
    assert "no such model folder" in lines[-1]
    assert "Traceback" not in proc.stderr
