"""Prefetch of table rows from disk (madvise WILLNEED on the rows' pages)."""
import numpy as np
from numpy.typing import NDArray

def willneed_rows(table: NDArray[np.uint8], rows: NDArray[np.int64], page: int, gap_pages: int) -> tuple[int, int]: ...
