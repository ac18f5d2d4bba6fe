"""The command line: every numeric/choice option is checked at parse time (one line, exit 2, no
traceback), and README.md's command list names only commands, options and choices that exist."""
import argparse
import re
from pathlib import Path

import pytest

from evssd.host import cli_types as ct
from evssd.host.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"


def _parsers(parser, path=("evssd",)):
    """(path, parser) for the root and every subcommand, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_no_numeric_option_is_left_unchecked():
    bare = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.type in (int, float):
                bare.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not bare, f"options parsed with bare int/float (no range check): {bare}"


def _required_args(parser):
    out = []
    for action in parser._actions:
        if action.required and action.option_strings:
            out += [action.option_strings[-1], "x"]
    return out


def test_every_checked_option_refuses_garbage_with_one_line(capsys):
    tried = 0
    for path, parser in _parsers(build_parser()):
        if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            continue
        for action in parser._actions:
            if not action.option_strings or action.type is None or action.type is str:
                continue
            argv = list(path[1:]) + [action.option_strings[-1], "1e999x"]
            with pytest.raises(SystemExit) as exc:
                build_parser().parse_args(argv + _required_args(parser))
            assert exc.value.code == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith(f"{' '.join(path)}: error: argument {'/'.join(action.option_strings)}"), err
            assert not any("Traceback" in line for line in err)
            tried += 1
    assert tried >= 60, tried  # every benchmark and serving option is in the walk


BAD = [
    ("demo --rows 0", "argument --rows: 0 is out of range: must be a positive integer"),
    ("demo --batches -1", "argument --batches: -1 is out of range"),
    ("demo --batch-size 0", "argument --batch-size: 0 is out of range"),
    ("demo --cache-fraction 1.5", "argument --cache-fraction: 1.5 is not a fraction in (0, 1]"),
    ("demo --cache-fraction 0", "is not a fraction in (0, 1]"),
    ("demo --cache-fraction nan", "'nan' is not a finite number"),
    ("demo --tables 0", "argument --tables: 0 is out of range: must be a table count in 1..16"),
    ("demo --dim abc", "argument --dim: 'abc' is not an integer"),
    ("demo --seed -3", "argument --seed: -3 is out of range"),
    ("demo --backend ssd", "argument --backend: invalid choice: 'ssd'"),
    ("info --baud 0", "argument --baud: 0 is out of range"),
    ("info --backend ssd", "argument --backend: invalid choice: 'ssd'"),
    ("bench cache --budgets 0,200", "argument --budgets: 0 is not a percentage in (0, 100]"),
    ("bench cache --dtype bf16", "argument --dtype: invalid choice: 'bf16'"),
    ("bench store --peers dram,foo", "argument --peers: 'foo' is not one of dram"),
    ("bench store --max-seconds -1", "argument --max-seconds: -1 must be > 0"),
    ("bench rtl --sizes 64,,128", "argument --sizes: '64,,128' is not a comma-separated list"),
    ("bench rtl --page-size 1000", "argument --page-size: 1000 is not a power of two"),
    ("bench synth --families ecp5,arty", "argument --families: 'arty' is not one of ecp5, xcup"),
    ("bench serve --threads 0", "argument --threads: 0 is out of range"),
    ("serve embeddings --config c --server s --port 70000", "argument --port: 70000 is out of range: must be a TCP port in 0..65535"),
    ("serve ranker --config c --timeout -1", "argument --timeout: -1 must be > 0"),
    ("serve config -o x --skew 1,a", "argument --skew: 'a' is not a number"),
    ("serve local --replicas -1", "argument --replicas: -1 is out of range"),
    ("synth --clock-mhz 0", "argument --clock-mhz: 0 must be > 0"),
    ("sim run device --channels 0", "argument --channels: 0 is out of range"),
]


@pytest.mark.parametrize("line,message", BAD, ids=[b[0] for b in BAD])
def test_bad_argument_is_one_line_and_exit_2(line, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(line.split())
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("evssd ")


def test_arguments_that_do_not_fit_together_are_refused_before_any_work(capsys):
    assert main(["demo", "--rows", "100000000", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evssd demo: error: --tables 4 --rows 100000000 --dim 32:") and "do not fit" in err
    assert err.count("\n") == 1
    assert main(["demo", "--dim", "5000", "--no-progress"]) == 2
    assert "row limit" in capsys.readouterr().err
    assert main(["info", "--backend", "uart"]) == 2
    assert capsys.readouterr().err == "evssd info: error: --backend uart needs --port (e.g. /dev/ttyUSB0)\n"


def test_a_failure_at_run_time_is_one_line_without_traceback(capsys, monkeypatch):
    def boom(args):
        raise OSError("disk on fire")
    parser = build_parser()
    monkeypatch.setattr("evssd.host.cli.build_parser", lambda: parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.choices["info"].set_defaults(_run=boom)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err == "evssd info: error: OSError: disk on fire (EVSSD_DEBUG=1 shows the traceback)\n"
    monkeypatch.setenv("EVSSD_DEBUG", "1")
    with pytest.raises(OSError, match="disk on fire"):
        main(["info"])


def _readme_command_lines():
    text = README.read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        lines += [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip().startswith("evssd ")]
    lines += re.findall(r"`(evssd [^`]*)`", text)
    return lines


def _check_line(parser, tokens, line):
    """Walk ``tokens`` (with a|b alternatives and [optional] groups) through the parser."""
    i = 0
    while i < len(tokens):
        tok = tokens[i].strip("[]")
        if tok in ("...", ""):
            i += 1
            continue
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if tok.startswith("-"):
            names = tok.split("|")
            options = {s: a for a in parser._actions for s in a.option_strings}
            for name in names:
                assert name in options, f"README `{line}`: {name} is not an option here"
            action = options[names[0]]
            if action.nargs != 0 and i + 1 < len(tokens) and not tokens[i + 1].startswith(("-", "[-")):
                value = tokens[i + 1].strip("[]")
                if action.choices is not None and value not in ("...",):
                    for v in value.split("|"):
                        assert v in action.choices, f"README `{line}`: {v} is not a choice of {names[0]}"
                i += 1
            i += 1
            continue
        alternatives = tok.split("|")
        if subs:
            for alt in alternatives:
                assert alt in subs[0].choices, f"README `{line}`: no subcommand {alt!r}"
            for alt in alternatives:  # the rest of the line applies to each alternative
                _check_line(subs[0].choices[alt], tokens[i + 1:], line)
            return
        positionals = [a for a in parser._actions if not a.option_strings and a.choices]
        assert positionals, f"README `{line}`: {tok!r} is not accepted here"
        for alt in alternatives:
            assert alt in positionals[0].choices, f"README `{line}`: {alt!r} is not a choice"
        i += 1


def test_readme_command_list_matches_the_parser():
    lines = _readme_command_lines()
    assert len(lines) >= 8
    parser = build_parser()
    for line in lines:
        _check_line(parser, line.split()[1:], line)


def test_the_readme_check_catches_a_role_that_does_not_exist():
    with pytest.raises(AssertionError, match="no subcommand 'cluster'"):
        _check_line(build_parser(), "serve embeddings|ranker|cluster".split(), "x")


def test_validators_accept_what_they_should():
    assert ct.positive_int("7") == 7 and ct.nonneg_int("0") == 0 and ct.port("0") == 0
    assert ct.fraction("1") == 1.0 and ct.power_of_two("4096") == 4096
    assert ct.int_list()("64, 128") == "64, 128" and ct.choice_list(["a", "b"])("b,a") == "b,a"
    for fn, text in [(ct.positive_int, "1.5"), (ct.fraction, "inf"), (ct.port, "-1"), (ct.percent, "101")]:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_readme_command_list_names_every_command_and_bench():
    from evssd.host.cli import BENCHES, COMMANDS
    block = "\n".join(re.findall(r"```sh\n(.*?)```", README.read_text(), re.S))
    lines = [ln.split("#")[0].split() for ln in block.splitlines() if ln.startswith("evssd ")]
    named = {ln[1] for ln in lines if len(ln) > 1}
    assert set(COMMANDS) | {"bench"} <= named, set(COMMANDS) - named
    bench = [ln for ln in lines if len(ln) > 2 and ln[1] == "bench"]
    assert bench and set(bench[0][2].split("|")) == set(BENCHES), bench
