"""A simulated OpenAI / Groq upstream with fault injection (never imported by `worker`)."""

from devstack.upstream.faults import Fault, FaultKind, FaultQueue
from devstack.upstream.server import SimulatedUpstream
from devstack.upstream.tokens import tokenize

__all__ = ["Fault", "FaultKind", "FaultQueue", "SimulatedUpstream", "tokenize"]
