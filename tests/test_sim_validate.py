"""The simulator against the real server, short and with wide bands (bench/sim_validate.py is the full check).

A `moekit serve --step-log` subprocess gets a Poisson workload from `moekit bench serve --save-detailed`; the
profile is fitted on that server's own log (step times, the loop's gaps, the time outside the engine from the
client's detail file), and the simulator replays the detail file's very arrivals and lengths with the server's
pool and limits. Compared: `moekit bench serve`'s own figures. The bands are wide (a short run on a shared machine);
what the test catches is a simulator that schedules differently from the server (a missing gap, a wrong
admission rule, arrivals at the wrong time), which moves these figures by integer factors.
"""

import json

import pytest
from test_serve_utils import ServerProcess, write_run

from moekit.cli import main
from moekit.sim import calibrate
from moekit.sim.simulator import Deployment, simulate
from moekit.sim.steptime import ProfileModel
from moekit.sim.workload import load_trace


def test_simulator_reproduces_the_servers_latency_and_throughput(tmp_path, capsys):
    write_run(tmp_path / "run", seed=1)
    log = tmp_path / "steps.jsonl"
    server = ServerProcess(tmp_path / "run", tmp_path / "server.log", "--step-log", str(log),
                           "--max-num-seqs", "16", "--max-num-batched-tokens", "128")
    try:
        argv = ["bench", "serve", "--url", f"http://127.0.0.1:{server.port}", "--num-prompts", "60",
                "--request-rate", "30", "--prompt-len", "uniform:8:48", "--output-len", "uniform:4:16",
                "--ignore-eos", "--tokenizer", str(tmp_path / "run"), "--seed", "3", "--no-progress",
                "--save-detailed", str(tmp_path / "detail.jsonl")]
        assert main(argv) == 0
        real = json.loads(capsys.readouterr().out)
    finally:
        assert server.stop() == 0, server.output()
    assert real["completed"] == 60

    prof = calibrate.profile_from_log(log, client_detail=tmp_path / "detail.jsonl")
    assert prof.fit["latency_requests"] == 60 and prof.latency_s > 0
    dep = Deployment.of_engine(prof.engine)
    reqs = load_trace(tmp_path / "detail.jsonl")
    assert [r.output_len for r in reqs] == [json.loads(x)["output_len"] for x in
                                            (tmp_path / "detail.jsonl").read_text().splitlines()]
    model = ProfileModel(prof)
    sim = simulate(reqs, lambda i: model, dep).summary()
    assert sim["completed"] == 60 and sim["total_output_tokens"] == real["total_output_tokens"]
    assert sim["output_throughput"] == pytest.approx(real["output_throughput"], rel=0.25)
    for key in ("median_ttft_ms", "median_tpot_ms", "p90_ttft_ms", "p90_tpot_ms"):
        assert 0.5 < sim[key] / real[key] < 2.0, (key, sim[key], real[key])
