"""Every method parameter says where its default comes from (the paper, the backbone's convention,
pseudo-validation, or an engineering choice with its reason), and `edgead info` shows it."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edgead.cli import app
from edgead.methods import get_method, implemented_methods
from edgead.methods.params import ORIGINS


@pytest.mark.parametrize("name", implemented_methods())
def test_every_default_states_its_origin(name: str) -> None:
    missing = []
    for row in get_method(name).Params.describe():
        if row["origin"] not in ORIGINS:
            missing.append(f"{row['name']}: origin {row['origin']!r}")
        elif row["origin"] != "paper" and not row["why"].strip():
            missing.append(f"{row['name']}: origin {row['origin']} without a reason")
        elif "test" in row["why"] and "no test" not in row["why"] and "not tuned on test" not in row["why"]:
            missing.append(f"{row['name']}: a reason that mentions test data: {row['why']!r}")
    assert not missing, "\n".join(missing)


def test_info_shows_the_fit_order_and_every_provenance() -> None:
    result = CliRunner().invoke(app, ["info", "--method", "gaussian"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "fit_order" in result.output and "default from" in result.output
    assert "not stated" not in result.output
