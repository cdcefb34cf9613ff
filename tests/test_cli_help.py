"""Every command `marginface --help` lists exists and answers --help; `marginface bench heads` runs and checks input."""

from __future__ import annotations

import argparse
import json

import pytest

from marginface import cli


def all_command_paths() -> list[list[str]]:
    """Every command and sub-command path of the parser, e.g. ["data", "pack"]."""
    paths = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    paths.append([*prefix, name])
                    walk(child, [*prefix, name])

    walk(cli.build_parser(), [])
    return paths


def test_every_listed_command_is_registered():
    top = {path[0] for path in all_command_paths()}
    assert top == {name.replace("_", "-") for name in cli.COMMAND_MODULES}


@pytest.mark.parametrize("path", all_command_paths(), ids=" ".join)
def test_help_of_every_command(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: marginface " + " ".join(path))


def test_bench_heads_prints_every_variant(capsys):
    code = cli.main(["bench", "heads", "--margins", "CurricularFace", "--engines", "chunked", "--batch-size", "8",
                     "--classes", "300", "--embedding-size", "16", "--rounds", "1", "--no-memory", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    names = set(report["results"])
    assert {"3-GEMM floor", "curricularface@chunked", "arcface@chunked"} <= names
    row = report["results"]["curricularface@chunked"]
    assert row["best_seconds"] > 0 and row["ratio_to_floor"] > 0 and row["ratio_to_arcface"] > 0
    assert report["correctness"]["curricularface@chunked"] < 1e-4


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--classes", "1"], "--classes=1 is invalid"),
        (["--repeats", "0"], "--repeats=0 is invalid"),
        (["--margins", "arcfaec"], "unknown margin 'arcfaec'"),
        (["--engines", "fused"], "unknown engine 'fused'"),
        (["--device", "cuda:0"] , "sees no CUDA GPU"),
        (["--device", "gpu"], "--device 'gpu' is not a torch device"),
    ],
)
def test_bench_heads_bad_input_names_the_option(args, needle, capsys):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["bench", "heads", "--rounds", "1", "--no-memory", *args]) == 2
    assert needle in capsys.readouterr().err
