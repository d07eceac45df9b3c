"""GLUE data in the standard layout ($GLUE_DIR/<TASK>/{train,dev,test}.tsv) and the tasks' official metrics."""
from .glue import TASKS, GlueExample, TaskSpec, find_glue_dir, load_inputs, load_split, parse_source, task_spec
from .metrics import compute_metric

__all__ = ["TASKS", "GlueExample", "TaskSpec", "find_glue_dir", "load_inputs", "load_split", "parse_source",
           "task_spec", "compute_metric"]
