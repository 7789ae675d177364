"""`python -m vbshare.report <folder> [--control lora]`: the side-by-side table and plots of finished runs.

Reads only what every run directory holds (its summary, resolved config, metrics log and the test split's
predictions: vbshare.rundir), so it works on runs made on another machine, and imports nothing of the training
app. Runs are grouped by (task, metric) and groups are never mixed: a folder holding several is reported as one
sub-folder per group.
Writes, into `--out` (default <folder>/report):
  report.md / report.csv  one row per method configuration (runs equal in every setting but the seed): metric
                          mean, sample std and 95 % t-interval over seeds, the paired t-test against the control
                          over shared seeds, the per-example paired test against the control over the test
                          examples, each averaged over the shared seeds (exact sign test on correctness for
                          classification and exact match, Wilcoxon signed-rank on the per-example score of
                          generated text, e.g. ROUGE-L, else on per-example losses), stored /
                          trainable parameters, adapter bytes, wall time, peak memory
  pareto.png              metric against stored parameters (log axis) with 95 % CIs, one line per method across
                          its sizes; configurations storing 0 parameters (head-only) as horizontal lines
  bars.png                the metric per configuration from 0, with 95 % CIs
  curves.png              validation metric against step per configuration (mean over seeds, from the metrics logs)
  stages.csv              only when some run went through sparsifying stages (`trainer.sparsify`, SoRA): one
                          row per run and stage: the knob (λ or ξ), retained rank, the stage's scores
  sparsity_stages.png     the same runs: held-out score against retained rank, one line per run

Python API (used by vbshare.compare and the notebooks), one module per job:
    stats.py     mean_ci / paired_p / mcnemar_p / wilcoxon_p: the statistics
    runs.py      collect_runs(root or run dirs) -> one row per run; split_groups(runs) -> {(task, metric): runs}
    examples.py  read_predictions, paired_examples, examples_vs_control: the per-example pairs and their test
    table.py     summarise(runs, control) -> one row per configuration (one task and metric only); pareto_front;
                 stage_table (the sparsifying stages)
    plots.py     pareto_plot, bar_plot, validation_curve, curves_plot, stages_plot
    markdown.py  markdown_table, count_text; write_report(runs, out, control, references); reference_score
    cli.py       main (python -m vbshare.report)
Method-specific columns are the methods' own: every number a run's adapter reports in its summary's `sharing`
(`sharing_pattern()` of the adapter contract: SoRA's retained rank, ASLoRA's merges, ...) becomes a column,
averaged over seeds, without the report knowing what it means.
"""
from .cli import main
from .examples import examples_vs_control, paired_examples, read_predictions
from .markdown import count_text, markdown_table, reference_score, write_report
from .plots import bar_plot, curves_plot, pareto_plot, stages_plot, validation_curve
from .runs import collect_runs, split_groups
from .stats import mcnemar_p, mean_ci, paired_p, wilcoxon_p
from .table import DEFAULT_CONTROL, method_rank, pareto_front, stage_table, summarise

__all__ = ["DEFAULT_CONTROL", "bar_plot", "collect_runs", "count_text", "curves_plot", "examples_vs_control",
           "main", "markdown_table", "mcnemar_p", "mean_ci", "method_rank", "paired_examples", "paired_p",
           "pareto_front", "pareto_plot", "read_predictions", "split_groups", "stage_table", "stages_plot",
           "reference_score", "summarise", "validation_curve", "wilcoxon_p", "write_report"]
