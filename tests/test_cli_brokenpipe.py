"""A closed stdout (`marginface ... | head`) ends the command quietly, not with a traceback."""

import marginface.cli as cli


def test_broken_pipe_exits_quietly(monkeypatch, capfd):
    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    args, _ = parser.parse_known_args(["data"])
    monkeypatch.setattr(parser, "parse_known_args", lambda argv: (args, []))
    monkeypatch.setattr(args, "func", closed_pipe, raising=False)
    monkeypatch.setattr(cli.os, "dup2", lambda a, b: None)
    assert cli.main([]) == 0
    assert "Traceback" not in capfd.readouterr().err
