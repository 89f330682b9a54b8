"""One generic sharded training loop and the objectives plugged into it.

- ``step``: ``TrainState``, ``create_train_state``, ``make_train_step`` (the jitted, donated, sharded step).
- ``objectives/``: what a step minimises and what it trains on (``autoencoder``, ``lens``; a new objective is one
  file there with its ``setup``, named in ``objectives.SETUPS``).
- ``optimizer``: Adam with step decay in epochs.
- ``checkpoint``: Orbax checkpoints with the Grain iterator; ``load_params`` / ``save_params_checkpoint``.
- ``loop``: ``train_and_evaluate(config, workdir)``, what ``train.py`` calls.
"""
