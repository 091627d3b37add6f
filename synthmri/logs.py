"""Logging and progress bars in words a user understands."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # nibabel "fixes" bad headers with warnings; our validation reports those files itself
    logging.getLogger("nibabel").setLevel(logging.ERROR)
    # transport chatter (one INFO line per HTTP request to the Prefect/MLflow APIs): problems still show
    for name in ("httpx", "httpcore", "urllib3", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING if not verbose else logging.DEBUG)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def progress(items: Iterable[T], desc: str, unit: str, total: int | None = None, min_total: int = 0) -> Iterator[T]:
    """A progress bar with rate and ETA, on stderr, quiet when stderr is not a terminal and long.

    ``min_total``: no bar below this many items (a loop that is long only on a large set stays quiet on a small
    one)."""
    if min_total and (total if total is not None else len(items)) < min_total:  # type: ignore[arg-type]
        return iter(items)
    return iter(tqdm(items, desc=desc, unit=unit, total=total, dynamic_ncols=True, mininterval=1.0))
