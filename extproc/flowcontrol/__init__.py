"""Flow control: the queue that holds requests and the policies that order them.

A flow is (workload, criticality), one FIFO each. The controller releases a
request whenever its capacity gate has room, choosing among flow heads by the
policy's `less` over the metrics of that moment (O(log F) for policies with
stable keys). Every queued request leaves exactly once, with one outcome:
dispatched, rejected, timed out or cancelled.
"""

from extproc.flowcontrol.fair_share import FairSharePolicy
from extproc.flowcontrol.policies import POLICIES, PolicyOptions, make_policy
from extproc.flowcontrol.policy import FcfsPolicy, ScoreWeights, WorkloadAwarePolicy
from extproc.flowcontrol.queue import FlowController, FlowRequest, Ticket

__all__ = [
    "POLICIES",
    "FairSharePolicy",
    "FcfsPolicy",
    "FlowController",
    "FlowRequest",
    "PolicyOptions",
    "ScoreWeights",
    "Ticket",
    "WorkloadAwarePolicy",
    "make_policy",
]
