"""MMF's model contract: ``config_path()``, ``build()``, ``forward(batch) -> {"scores", "losses"}``."""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from villa_plugin.common.input_spec import InputSpec


class BaseModel(nn.Module):
    """Base class for registered models.

    Life cycle (as in MMF): ``Model(config)`` receives ``model_config.<name>``, then ``build()``
    creates the layers, then ``init_losses()`` builds the configured losses.

    ``forward(sample_list, perturbation=None)`` returns a dict with ``scores``. Calling the model
    (``model(batch)``) also fills ``output["losses"]`` (keys ``split/dataset/loss_name``) when the
    model has losses configured and the batch carries ``targets``, so trainers and the adversarial
    engine can read the task loss from the output of any registered model.

    ``perturbation`` is ``None`` or a dict ``{"text": Tensor|None, "image": Tensor|None}``; models
    that support VILLA implement :class:`villa_plugin.adversarial.protocol.Perturbable`
    (docs/adding_a_backbone.md).
    """

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.losses = None

    @classmethod
    def config_path(cls) -> Optional[str]:
        """Absolute path of this model's default YAML (merged under ``model_config.<name>``)."""
        return None

    def build(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement build()")

    def input_spec(self) -> InputSpec:
        """The sizes of what the built model accepts (vocabulary, labels, feature width), each with
        the config key that sets it; the trainer checks every dataset against them at set-up.
        The default declares nothing."""
        return InputSpec()

    def init_losses(self) -> None:
        from villa_plugin.losses import Losses

        loss_specs = self.config.get("losses", None) if hasattr(self.config, "get") else None
        self.losses = Losses(loss_specs or [])

    def forward(self, sample_list, perturbation: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def __call__(self, sample_list, *args, **kwargs):
        output = super().__call__(sample_list, *args, **kwargs)
        if not isinstance(output, dict) or "scores" not in output:
            raise TypeError(
                f"{type(self).__name__}.forward must return a dict with a 'scores' entry, "
                f"got {type(output).__name__}"
            )
        has_targets = hasattr(sample_list, "get") and sample_list.get("targets") is not None
        if self.losses is not None and len(self.losses) > 0 and has_targets and "losses" not in output:
            output["losses"] = self.losses(sample_list, output)
        return output

    def get_optimizer_parameters(self, optimizer_config) -> list:
        """Parameter groups for the optimizer; default: the reference's no-decay substring rule and
        ``optimizer.lr_multipliers`` (see :func:`villa_plugin.optim.build_param_groups`)."""
        from villa_plugin.optim import build_param_groups

        return build_param_groups(self, optimizer_config)
