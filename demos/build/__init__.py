"""The build of the bundled default models, one module per stage: ``common`` (tokenizer, processor, target
config, data pool, held-out checks), ``vision_stage`` (stage 1), ``target_stage`` (stages 2 and 3),
``drafter_stage`` (the drafters, through ``mmspec train-drafter``), ``export`` (into assets/), ``evaluate``
(held-out accuracy, acceptance through the engine, where the lookup head looks) and ``cli`` (the stages'
command lines, ``python -m demos.build_default_models``)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
