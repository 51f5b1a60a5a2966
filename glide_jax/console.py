"""Console logging for the command-line entry points: our INFO lines, library chatter at WARNING."""
from __future__ import annotations

import logging

from absl import logging as absl_logging

NOISY = ("absl", "orbax", "jax", "tensorflow_datasets", "grain", "etils")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    if not verbose:
        for name in NOISY:
            logging.getLogger(name).setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
