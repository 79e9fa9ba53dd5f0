"""``moe-local serve`` checks its address, log level and key before building the demo or loading."""

from __future__ import annotations

import pytest

from tests.helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "70000"], "port 70000 is out of range"),
        (["--port", "-1"], "out of range"),
        (["--host", "no-such-host.invalid"], "does not resolve"),
        (["--log-level", "loud"], "unknown log level"),
        (["--api-key", " padded "], "API key"),
    ],
)
def test_serve_refuses_bad_arguments_before_anything_loads(capsys, monkeypatch, args, needle):
    import moe_local.cli.load_flags as load_flags
    import moe_local.cli.run as run

    def no_model(*args, **kwargs):
        raise AssertionError("the model (or the demo) was prepared before the arguments were checked")

    monkeypatch.setattr(load_flags, "model_or_demo", no_model)
    monkeypatch.setattr(run, "prepare_load", no_model)
    code, _, err = run_cli(capsys, "serve", *args)
    assert_one_line_error(code, err, needle)
