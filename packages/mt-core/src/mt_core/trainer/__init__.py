"""The trainer room: one run from its run file to its last step.

- ``setup``: builds the :class:`~mt_core.trainer.setup.Run` (data, model, OSFT, optimizer,
  schedule, resume, reporting) from the run's arguments;
- ``step``: one optimizer step (``train_step``); ``after_step``: what follows it (validation,
  metrics, exports, checkpoints, stop); ``loop``: ``train``, which runs them in turn;
- the loop's helpers: ``data`` (the run's token stores and sampler), ``loss``, ``validation``,
  ``osft`` (OSFT's set-up), ``counters`` (what a checkpoint resumes and when things are due),
  ``lifecycle`` (output folder, stop signals), ``peers`` (which ranks are gone when a
  collective fails, and the one message that says so), ``callbacks``, ``metrics``,
  ``tracking``, ``library_noise`` (the libraries' warnings a user cannot act on, quiet during
  a run).

May import: every room below it (config, model, optim, plan) and mt_data, mt_fsdp, mt_osft.
Nothing imports it but mt_core's top level (``train``) and the app.
"""
