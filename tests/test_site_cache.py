"""The ClientApp process keeps the sites it serves while they are small (issue 17: one Ray
actor serves many simulated sites; rebuilding a site per message made 100 sites crawl)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fedspatial.client import site as client_site


@dataclass
class _Runtime:
    n_cells: int
    loaded: bool = True


def test_lru_sites_dropped_beyond_the_cell_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_site, "_CACHE", client_site.OrderedDict())
    monkeypatch.setattr(client_site, "_CACHE_CELLS", 1000)
    monkeypatch.setattr(client_site, "_CACHE_SIZE", 3)
    cache = client_site._CACHE
    for i in range(3):
        cache[(i,)] = _Runtime(300)  # type: ignore[assignment]
        client_site._evict()
    assert list(cache) == [(0,), (1,), (2,)]  # 900 cells: all kept
    cache[(3,)] = _Runtime(50, loaded=False)  # type: ignore[assignment]
    client_site._evict()
    assert list(cache) == [(1,), (2,), (3,)]  # 4 entries > _CACHE_SIZE: the oldest goes
    cache[(4,)] = _Runtime(600)  # type: ignore[assignment]
    client_site._evict()
    assert list(cache) == [(2,), (3,), (4,)]  # 4 entries: (1,) goes; then 900 loaded cells fit
    cache[(5,)] = _Runtime(200)  # type: ignore[assignment]
    client_site._evict()
    assert list(cache) == [(3,), (4,), (5,)]  # 4 entries: (2,) goes; 800 loaded cells fit
    cache[(6,)] = _Runtime(5000)  # type: ignore[assignment]
    client_site._evict()
    assert list(cache) == [(6,)]  # the newest stays, however large
