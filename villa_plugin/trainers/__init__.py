"""Trainers: ``mmf`` (the plain loop) and, from other modules, free-AT subclasses."""
from villa_plugin.trainers.base_trainer import MMFTrainer  # noqa: F401
from villa_plugin.trainers.callbacks import Callback  # noqa: F401
