"""The run layer: one run's assembled pieces and what a run does with them.

- :mod:`~mmbridge.runtime.session`: :class:`~mmbridge.runtime.session.Session` (config,
  registry, model, chat encoder, data, feature caches, precision, device) and its
  constructors :func:`~mmbridge.runtime.session.open_session` /
  :func:`~mmbridge.runtime.session.session_from_checkpoint`;
- :mod:`~mmbridge.runtime.stage`: :func:`~mmbridge.runtime.stage.prepare_stage`, one stage's
  recipe and data sets;
- :mod:`~mmbridge.runtime.train`: a training run (its stages, then the evaluation and
  ``metrics.json``);
- :mod:`~mmbridge.runtime.evaluate`: one evaluation of a run's model.

The layer sits above :mod:`mmbridge.training` (the Lightning machinery) and
:mod:`mmbridge.evaluation` (the scoring), which take collaborators (a model, a batcher, a
stage's config) and never a run, and above :mod:`mmbridge.data`; nothing below imports it.
"""
