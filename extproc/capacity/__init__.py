"""Capacity gates: how many released requests the backend may hold now.

The flow controller asks its gate before every release and reports dispatch,
first byte and completion back; a gate whose room grows by itself (a scrape, a
window) wakes the controller, so nothing polls. Gates: `static` (a fixed
limit), `metrics` (the model servers kept full, their own queues at a threshold,
their slot counts learnt from scrapes and first bytes; `ServerLoad` is that rule
for one endpoint) and `adaptive` (the knee found from latency).
Stale or missing signals fall back to `--max-concurrency`; no gate ever halts.
"""

from extproc.capacity.adaptive import AdaptiveCapacity, AdaptiveOptions
from extproc.capacity.saturation import MetricsCapacity, SaturationOptions, ServerLoad
from extproc.capacity.scraper import Scraper
from extproc.capacity.static import Gate, StaticCapacity

__all__ = [
    "AdaptiveCapacity",
    "AdaptiveOptions",
    "Gate",
    "MetricsCapacity",
    "SaturationOptions",
    "Scraper",
    "ServerLoad",
    "StaticCapacity",
]
