"""The host-side page pool of the paged KV cache: allocation, refcounts and the prefix cache.

A full page is keyed by a hash chain of its tokens (the hash of the previous page's key and its own P tokens),
so equal keys mean equal prefixes and hence equal K/V. Requests sharing a prefix share its pages (refcounted);
a page whose last user finished stays cached, in LRU order, until an allocation needs it. Pages that hold no
cached prefix are handed out first.

Each KV group of the cache (runtime.cache: full-attention layers, sliding-window layers) has its own pool. A row
of the window group holds only the pages its window can still see (``window_pages``), so that pool is sized by
``window_pool_pages`` rather than by the context.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def chain_hashes(tokens: Sequence[int], page_size: int, n_pages: int, start: int = 0, parent: int | None = None):
    """Keys of the full pages ``start .. n_pages-1`` of ``tokens``, each chained on the one before (``parent``:
    the key of page start-1)."""
    keys = []
    for i in range(start, n_pages):
        parent = hash((parent, tuple(tokens[i * page_size : (i + 1) * page_size])))
        keys.append(parent)
    return keys


def window_pages(window: int, page_size: int, tokens: int) -> int:
    """The most window-group pages one row holds while it feeds ``tokens`` tokens at once: the pages from the one
    holding the oldest key its first query sees (window - 1 positions back) to the one its last token goes in.
    A decoding row (one token) holds ceil(window / P) + 1."""
    return -(-(window - 1 + tokens) // page_size) + 1


def window_pool_pages(window: int, page_size: int, max_seqs: int, token_budget: int) -> int:
    """Window-group pages that never run out while at most ``max_seqs`` rows run and a step feeds at most
    ``token_budget`` tokens: a row fed n tokens holds at most ceil(w/P) + 2 + floor((n - 1) / P) pages
    (``window_pages``), and the n of one step add up to the budget."""
    return max_seqs * (window_pages(window, page_size, 1) + 1) + token_budget // page_size


class PagePool:
    """``n_pages`` page ids with refcounts. ``allocate`` takes a free page (evicting its cached prefix if it held
    one), ``release`` drops a reference, ``lookup`` finds and pins a cached page, ``register`` publishes a full
    page under its key."""

    def __init__(self, n_pages: int, *, prefix_caching: bool):
        self.n_pages = n_pages
        self.prefix_caching = prefix_caching
        self.refs = [0] * n_pages
        self.free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(n_pages))  # front: reused first
        self.key_of: dict[int, int] = {}  # page -> its prefix key
        self.page_of: dict[int, int] = {}  # prefix key -> page
        self.lookups_hit = 0  # pages served from the prefix cache so far

    @property
    def n_free(self) -> int:
        return len(self.free)

    @property
    def n_used(self) -> int:
        return self.n_pages - len(self.free)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages (refcount 1), or None (nothing taken) when fewer than n are free."""
        if n > len(self.free):
            return None
        out = []
        for _ in range(n):
            page, _ = self.free.popitem(last=False)
            key = self.key_of.pop(page, None)
            if key is not None:
                del self.page_of[key]
            self.refs[page] = 1
            out.append(page)
        return out

    def release(self, pages: Sequence[int]) -> None:
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                self.free[page] = None
                if page not in self.key_of:
                    self.free.move_to_end(page, last=False)

    def cached(self, key: int) -> bool:
        """Whether a page holds the prefix of ``key`` (nothing pinned)."""
        return self.prefix_caching and key in self.page_of

    def lookup(self, key: int) -> int | None:
        """The cached page for a prefix key, pinned (refcount + 1), or None."""
        page = self.page_of.get(key) if self.prefix_caching else None
        if page is not None:
            if self.refs[page] == 0:
                del self.free[page]
            self.refs[page] += 1
            self.lookups_hit += 1
        return page

    def register(self, page: int, key: int) -> None:
        """Publish a full page under its prefix key (a key already cached keeps its first page)."""
        if self.prefix_caching and key not in self.page_of and page not in self.key_of:
            self.page_of[key] = page
            self.key_of[page] = key
