"""workload-extproc: workload-aware fair queuing for Envoy, as an ext_proc service."""

__version__ = "0.1.0"
