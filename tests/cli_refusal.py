"""Running the command line expecting it to refuse its arguments."""
from __future__ import annotations

from tokensieve import cli


def refusal(argv: list[str], capsys) -> str:
    """Run the command expecting a refusal: exit status 2 and one line on stderr, no traceback; returns it."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse refused a value
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()
