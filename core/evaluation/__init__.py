"""Evaluation, shared by ``mmbridge train`` (after the last stage) and ``mmbridge eval``.

- :mod:`~mmbridge.evaluation.qa`: greedy answers, exact match / WER per question type, the
  no-media and majority-answer baselines;
- :mod:`~mmbridge.evaluation.tools`: the same questions answered through Tool Learning callers;
- :mod:`~mmbridge.evaluation.runner`: one evaluation of a run (every configured part, the
  predictions file).
"""
