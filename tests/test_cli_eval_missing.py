"""`marginface eval` on a path that does not exist says so."""

from marginface.cli import main


def test_eval_missing_model_path(tmp_path, capsys):
    missing = tmp_path / "runs" / "nonexistent"
    assert main(["eval", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(missing) in err
