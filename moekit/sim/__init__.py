"""moekit.sim: a discrete-event serving simulator that drives the engine's own Scheduler on a simulated clock.

Nothing else in moekit imports it (the `moekit sim` command loads it), except `moekit bench serve --trace`,
which reads traces with the torch-free workload.py. Modules:
  workload.py   arrivals (Poisson, gamma, a daily curve), length distributions, shared prefixes, Azure traces
  steptime.py   step time of a micro-batch: the planner's per-stage roofline, or a measured profile
  replica.py    one replica: the real Scheduler + KVCacheManager, pipelined micro-batches on a clock
  router.py     round robin, least loaded, prefix-aware
  simulator.py  the event loop over arrivals and replicas
  metrics.py    `moekit bench serve`'s figures plus utilization, KV occupancy, $ per 1k tokens
  profile.py    a measured step-time profile;  calibrate.py: `moekit sim calibrate` measures one
  replay.py     `moekit sim replay`: a server's step log through the simulator, same decisions?
  charts.py     latency and cost against load, load over time
  cli.py        `moekit sim`
"""
