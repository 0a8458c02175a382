"""The service: the ext_proc stream handler and everything a process serves.

`extproc.py` maps Envoy's stream onto the three tracking points (request
headers = new, the answer to them = dispatched, the response's end = completed)
and counts every request out exactly once on every path; `app.py` wires the
registry, gate, flow controller and servers; `readapi.py`, `admin.py` and
`metrics.py` are the read side (gRPC, HTTP, Prometheus), guarded by `auth.py`.
"""

from extproc.service.app import Service, run
from extproc.service.extproc import ExternalProcessorService

__all__ = ["ExternalProcessorService", "Service", "run"]
