"""Build, train, export and evaluate the bundled default models: ``python -m demos.build_default_models STAGE``.

The stages live in :mod:`demos.build`, one module each; ``--help`` lists them.
"""

from demos.build.cli import build_parser, main
from vision.scenes import TRAIN_SEED_START  # the training scenes start here (tests/test_scenes.py checks it)

__all__ = ["build_parser", "main", "TRAIN_SEED_START"]

if __name__ == "__main__":
    main()
