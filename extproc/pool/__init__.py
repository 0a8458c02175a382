"""Endpoint picking: which model server a released request goes to.

`pool.EndpointPool` holds the endpoints found by discovery (`discovery`:
static, DNS, a Kubernetes InferencePool), each with its scraped load and
its own requests there (`endpoints`) and its remembered prompt prefixes
(`prefix`); a picker (`picker`: round robin, least loaded, or the weighted `scorers`) ranks them.
The flow controller decides when a request goes and asks the pool where.
"""

from extproc.pool.endpoints import Endpoint, EndpointOptions, EndpointSnapshot
from extproc.pool.picker import PICKERS, Picker, make_picker
from extproc.pool.pool import EndpointPool, PoolStatus
from extproc.pool.scorers import ScorerWeights

__all__ = [
    "PICKERS",
    "Endpoint",
    "EndpointOptions",
    "EndpointPool",
    "EndpointSnapshot",
    "Picker",
    "PoolStatus",
    "ScorerWeights",
    "make_picker",
]
