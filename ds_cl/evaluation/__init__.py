"""Retention evaluation for ds-cl: instruction following (IFEval), safety (refusals), general
ability (lm-evaluation-harness), and base-vs-checkpoint reports across a task sequence.

Command lines: `ds-cl eval` (generate + score, `ds_cl.evaluation.cli`) and `ds-cl score`
(score existing responses or build a report, `ds_cl.evaluation.score_cli`). Stratified IFEval
halves: `ds_cl.evaluation.splits`; paired McNemar test: `ds_cl.evaluation.stats`.
"""
