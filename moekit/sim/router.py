"""Routers: which replica a new request goes to.

- `round-robin`: in turn, blind to load (a plain L4 load balancer).
- `least-loaded`: the replica with the fewest unfinished requests (ties: the lowest index); what vLLM's
  production-stack router and most gateways do by default.
- `prefix`: requests that share a system prompt go where that prompt was last served, so its blocks are
  prefix-cache hits there, unless that replica is well above the least loaded one (then least-loaded, and the
  prefix moves): the cache-aware routing of SGLang's router and llm-d, with their load-balance guard.
"""

from __future__ import annotations

ROUTERS = ("round-robin", "least-loaded", "prefix")
# The prefix router keeps a prefix on its replica while its load <= BALANCE x the least load + SLACK requests.
BALANCE, SLACK = 1.25, 8


class Router:
    def __init__(self, policy: str, replicas: list):
        if policy not in ROUTERS:
            raise ValueError(f"--router {policy!r}: choose one of {', '.join(ROUTERS)}")
        self.policy, self.replicas = policy, replicas
        self.next = 0
        self.home: dict[int, int] = {}  # prefix_id -> the replica that last served it

    def _least(self):
        return min(self.replicas, key=lambda r: (r.load, r.index))

    def choose(self, prefix_id: int = -1):
        reps = self.replicas
        if len(reps) == 1:
            return reps[0]
        if self.policy == "round-robin":
            r = reps[self.next % len(reps)]
            self.next += 1
            return r
        least = self._least()
        if self.policy == "prefix" and prefix_id >= 0:
            home = self.home.get(prefix_id)
            if home is not None and reps[home].load <= BALANCE * least.load + SLACK:
                return reps[home]
            self.home[prefix_id] = least.index
        return least
