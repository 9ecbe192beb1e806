"""The planner: cost models of training and serving MoE models that reproduce (and correct) the GPT-4 article.

    from moekit import plan
    plan.train("gpt4", gpu="A100-80GB", n_gpus=25_000, tokens=13e12, mfu=0.34).days      # ~95
    plan.serve("gpt4", gpu="H100", weight_dtype="fp8", kv_dtype="fp8").cost_per_1k_output
    plan.wall("H100", n_gpus=8, tokens_per_s=20, hbm_gb_s=3000).max_params               # ~300e9
    print(plan.format_report(plan.gpt4_report()))                                        # `moekit plan`
    plan.vision_plan("gpt4-vision").io.ratio                                             # ~147 (SPEC 5: ~150x)

Pure functions over `moekit.config` and the hardware table (`hardware.py`), returning dataclasses;
`moekit plan ...` (`cli.py`) is a thin layer over them. Files: hardware.py (GPUs as data),
layout.py (pipeline stages, sharding), train.py (+ step_time.py, gemm.py: the step from its parts;
calibrate_train.py: its fit on published runs), serve.py, wall.py, vision.py (SPEC section 5), report.py,
charts.py. It imports no engine or trainer: `moekit bench hardware` (moekit/bench_hardware.py) measures a
machine's entry.
"""

from moekit.plan.charts import write_charts
from moekit.plan.comm import step_collectives
from moekit.plan.hardware import GPU, TABLE, get_gpu, known_gpus, load_hardware_file, local_hardware_path
from moekit.plan.layout import as_config, stages
from moekit.plan.report import Claim, Report, format_report, gpt4_report
from moekit.plan.serve import ServePlan, expert_coverage, serve
from moekit.plan.shards import rank_bytes
from moekit.plan.step_time import StepTime, step_time
from moekit.plan.train import TrainPlan, train
from moekit.plan.vision import VisionPlan, vision_plan
from moekit.plan.wall import Wall, article_h100, max_tokens_per_s, wall

__all__ = ["GPU", "TABLE", "Claim", "Report", "ServePlan", "TrainPlan", "Wall", "article_h100", "as_config",
           "expert_coverage", "format_report", "get_gpu", "gpt4_report", "known_gpus", "load_hardware_file",
           "local_hardware_path", "max_tokens_per_s", "rank_bytes", "serve", "stages", "step_collectives", "step_time",
           "StepTime", "train", "VisionPlan", "vision_plan", "wall", "write_charts"]
