"""What a run produced, in one place: the statistics (`stats`), the primary metric of each task
and typed score rows (`scores`), the leaderboard with MergeBench's measures and the run summary
(`leaderboard`), the fragility summaries with their uncertainty (`fragility`), and the
comparison of a run with the previous run of its audit (`compare`). The flow, the CLI, the
report and the demo verdict read from here; nothing in this package imports torch or Prefect.

    from mergeaudit.results import compare, leaderboard, load_run
    run = load_run(RESULTS)                     # the latest committed run
    board = leaderboard.rows(run)
    check = compare.check_run(RESULTS, run.run_id)
"""

from mergeaudit.results import compare, fragility, leaderboard, stats
from mergeaudit.results.scores import RunResults, ScoreRow, load_run, primary_metric

__all__ = ["RunResults", "ScoreRow", "compare", "fragility", "leaderboard", "load_run", "primary_metric", "stats"]
