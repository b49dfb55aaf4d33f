"""The command line's skeleton: --help works at every level."""

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["forecast"], ["genomics"], ["lm"], ["bench"]])
def test_help_at_every_level(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
