"""`python -m revlearn.data download [DIR]`: fetch the four MNIST files once, verified.

DIR defaults to where `load_mnist("mnist")` looks (`revlearn.data.mnist_dir`:
$REVLEARN_DATA, else $XDG_CACHE_HOME/revlearn/mnist). Files already there are
kept. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from revlearn.data._download import download_mnist
from revlearn.data._errors import DataError
from revlearn.data._mnist import check_source, mnist_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m revlearn.data",
                                     description="Fetch the full MNIST set for --data mnist.")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download the four MNIST files (each once, verified)")
    dl.add_argument("data_dir", nargs="?", metavar="DIR",
                    help="target folder (default: $REVLEARN_DATA or the user cache)")
    args = parser.parse_args(argv)
    folder = mnist_dir(args.data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = download_mnist(folder)
        check_source("mnist", folder)
    except (DataError, OSError) as e:
        print(f"python -m revlearn.data: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
