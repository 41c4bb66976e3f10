"""The garbage collector of a serving process, set for serving once the process has started.

By then a process holds a few hundred thousand objects that live as long as it does: torch, FastAPI,
pydantic's schemas, the model. CPython's collector would walk all of them in every full collection,
stopping the event loop (and every request on it) each time, for as long as a forward pass takes.
Frozen, they are out of its sight, and it walks only what requests allocate.

Its first generation is collected whenever allocations outnumber deallocations by a threshold, 700
by default. The requests in flight on one event loop hold more than that between them, so it ran
over and over on objects that refcounting frees a moment later anyway. The threshold here still
bounds what cyclic garbage can pile up before a collection: a few MB at most.

Measured in README, How serving works ("The garbage collector").
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 10_000  # net container allocations between collections of the first generation


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze what the process holds now and raise the first generation's threshold; undo both at the end."""
    threshold = gc.get_threshold()
    gc.collect()  # nothing that is garbage already gets frozen
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
