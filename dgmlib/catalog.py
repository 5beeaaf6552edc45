"""What ``dgm list`` and ``dgm --help`` show, read without importing torch.

The model registry (``dgmlib.models.MODELS``) is the one source of every model's description, options and
data; building it imports torch and every model module, which takes seconds. The command line needs only the
registry's words to answer ``dgm list`` and ``dgm --help``, so they are kept here as data in ``catalog.json``,
derived from the registry by ``python -m dgmlib.catalog`` and checked against it by the tests
(``tests/test_train_and_cli.py``). Only ``dgm train`` itself imports the registry.

Run ``python -m dgmlib.catalog`` after changing a model's description, options or data; ``--check`` exits 1
when the file is out of date.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

CATALOG_PATH = Path(__file__).with_name("catalog.json")
IMAGE_NAMES = ("digits", "mnist")
"""The image datasets: the bundled 8x8 digits (17 levels) and MNIST (28x28, 256 levels, downloaded)."""
TOY_NAMES = ("8gaussians", "checkerboard", "2spirals", "moons", "pinwheel", "swissroll")
"""The 2D toy datasets, continuous points in the plane."""


def build() -> dict[str, dict]:
    """The catalog derived from the registry: ``{model: {"description", "data", "default_data", "options"}}``,
    where ``data`` lists the datasets the model trains on and ``options`` maps each option to its
    ``{"choices", "default", "help"}``. Imports torch and every model module."""
    from dgmlib.models import MODELS

    names = {"images": IMAGE_NAMES, "toy2d": TOY_NAMES}
    return {name: {"description": spec.description,
                   "data": [c for kind in spec.data for c in names[kind]],
                   "default_data": spec.default_data,
                   "options": {key: {"choices": list(opt.choices), "default": opt.default, "help": opt.help}
                               for key, opt in spec.options.items()}}
            for name, spec in MODELS.items()}


def load() -> dict[str, dict]:
    """The catalog as stored in ``catalog.json`` (same layout as ``build``), without importing torch.

    Raises:
        FileNotFoundError: if ``catalog.json`` is missing (run ``python -m dgmlib.catalog``).
    """
    return json.loads(CATALOG_PATH.read_text(encoding="utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dgmlib.catalog [--check]``: rewrite ``catalog.json`` from the registry, or only check it."""
    parser = argparse.ArgumentParser(prog="python -m dgmlib.catalog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if catalog.json differs from the registry")
    args = parser.parse_args(argv)
    text = json.dumps(build(), indent=1, ensure_ascii=False) + "\n"
    if args.check:
        stale = not CATALOG_PATH.exists() or CATALOG_PATH.read_text(encoding="utf-8") != text
        print(f"{CATALOG_PATH} is {'out of date: run python -m dgmlib.catalog' if stale else 'up to date'}")
        return int(stale)
    CATALOG_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {CATALOG_PATH}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
