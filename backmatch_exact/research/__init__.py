"""The research commands ``backmatch compare``, ``train`` and ``bench``, and their figures.

Nothing here is needed to use the engine: these are the experiments that
``validation/`` runs. Nothing in here imports upward:

* ``figures`` draws the data it is handed and imports nothing from research;
* ``common`` holds what the commands share: model and optimizer names and builders, and the
  command-line plumbing (option types, one-line errors, strict JSON, output folders);
* the commands ``compare``, ``train`` and ``bench`` import ``figures`` and ``common``
  (and the engine below them), never each other.
"""
