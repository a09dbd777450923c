"""The command line's error contract, shared by the tests that call it."""

from revlearn.cli import main


def error_line(capsys, argv) -> str:
    """Run `revlearn argv`; assert exit status 2 and exactly one stderr line, the
    "revlearn: error: ..." one, with no traceback; return that line."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("revlearn: error: ") and "Traceback" not in err
    return lines[0]
