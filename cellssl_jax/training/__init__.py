"""One generic sharded training loop and the objectives plugged into it.

- ``step``: ``TrainState``, ``create_train_state``, ``make_train_step`` (the jitted, donated, sharded step).
- ``objectives/``: what a step minimises (``autoencoder``; a new objective is one file).
- ``optimizer``: Adam with step decay in epochs.
- ``checkpoint``: Orbax checkpoints with the Grain iterator; ``load_params`` / ``save_params_checkpoint``.
- ``loop``: ``train_and_evaluate(config, workdir)``, what ``train.py`` calls.
"""
