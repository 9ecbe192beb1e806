"""What a fleet pays over a day whose load varies: $ per 1k output tokens when the GPUs cost the same every hour.

    points = [CurvePoint(hour=14, hours=12, rate=10.0, output_tokens_per_s=2000.0), ...]
    day_cost(points, replicas=35, gpus_per_replica=128, price_per_gpu_hour=1.1).ratio   # day / peak hour

A fleet sized for the peak hour is paid for at the peak all day; its tokens follow the load (SPEC section 4: "poor
utilization would more than double" the cost). The points are hours of the day, each standing for `hours` of it
(evenly spaced points integrate a cosine day exactly: the midpoint rule); moekit/sim/claims.py simulates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CurvePoint:
    hour: float  # of the day's clock
    hours: float  # the span of the day it stands for
    rate: float  # requests/s offered to one replica
    output_tokens_per_s: float  # served by one replica, steady state
    busy: float = 0.0
    meets_slo: bool = True
    latency_s: dict = field(default_factory=dict)


@dataclass
class DayCost:
    replicas: int
    gpus_per_replica: int
    price_per_gpu_hour: float
    fleet_cost_per_day: float  # $
    day_output_tokens: float
    day_per_1k: float  # $ per 1k output tokens over the day
    peak_per_1k: float  # ... in the busiest hour simulated
    ratio: float  # day / peak hour


def day_cost(points: list[CurvePoint], replicas: int, gpus_per_replica: int, price_per_gpu_hour: float) -> DayCost:
    """The fleet's $ per 1k output tokens over the points' day: the fleet costs the same every hour whatever its
    load; each point serves its tokens/s per replica x replicas for its `hours`."""
    if not points:
        raise ValueError("no point of the day to integrate")
    hour_cost = replicas * gpus_per_replica * price_per_gpu_hour
    cost = hour_cost * sum(p.hours for p in points)
    tokens = sum(p.output_tokens_per_s * replicas * p.hours * 3600 for p in points)
    peak = max(points, key=lambda p: p.rate)
    peak_per_1k = hour_cost / (peak.output_tokens_per_s * replicas * 3600) * 1000
    day_per_1k = cost / tokens * 1000
    return DayCost(replicas, gpus_per_replica, price_per_gpu_hour, cost, tokens, day_per_1k, peak_per_1k,
                   day_per_1k / peak_per_1k)
