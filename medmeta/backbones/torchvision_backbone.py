"""``torchvision:<model>``: a torchvision classification model as a backbone (extra ``torchvision``).

The classifier is the model's last layer that outputs the class scores (``fc`` of a ResNet,
``classifier.1`` of an EfficientNet, ``heads.head`` of a ViT, ...); it becomes an identity, so the
model's output is the pooled features that layer took. The input is normalised with ImageNet's
mean and std, as for every torchvision classification checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medmeta.backbones.external import IMAGENET_MEAN, IMAGENET_STD, BackboneError, ExternalBackbone, ModelParts, first_line

# torchvision builds its classifiers with this many outputs unless told otherwise
IMAGENET_CLASSES = 1000


class TorchvisionBackbone(ExternalBackbone):
    """A torchvision model (``torchvision.models.get_model``) without its classifier.

    ``forward_features`` is the input of the model's last adaptive average pooling (the feature
    map of a CNN); models that pool otherwise (e.g. DenseNet, ViT) have none.
    """

    library = "torchvision"
    extra = "torchvision"

    @classmethod
    def model_names(cls) -> list[str]:
        models = cls.import_library().models
        return list(models.list_models(module=models))

    def build(self, model_name: str, model_kwargs: dict[str, Any]) -> ModelParts:
        models = self.import_library().models
        model = models.get_model(model_name, weights=None, **model_kwargs)
        name, layer = _classifier(model)
        if layer is None:
            raise BackboneError(f"{self.name}: no layer with {IMAGENET_CLASSES} outputs to remove (not a classification model?)")
        features = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        model.set_submodule(name, nn.Identity())
        self._pool_name = _last_adaptive_pool(model)
        return ModelParts(model=model, num_features=int(features), classifier=(name,), mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def has_pretrained(self) -> bool:
        try:
            return self._weights_enum() is not None
        except BackboneError:
            return False

    def pretrained_state_dict(self) -> dict[str, torch.Tensor]:
        weights = self._weights_enum()
        try:
            return dict(weights.DEFAULT.get_state_dict(progress=False))
        except Exception as exc:
            raise BackboneError(
                f"cannot download the pretrained weights of {self.name} ({first_line(exc)}); offline? Download "
                f"{weights.DEFAULT.url} on a connected machine and give the file with --backbone-weights FILE"
            ) from None

    def _weights_enum(self) -> Any:
        try:
            return self.import_library().models.get_model_weights(self.model_name)
        except Exception as exc:
            raise BackboneError(f"torchvision has no pretrained weights for {self.model_name} ({first_line(exc)})") from None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self._pool_name is None:
            raise NotImplementedError(f"{self.name} has no adaptive average pooling to take its feature map from")
        captured: list[torch.Tensor] = []
        pool = self.model.get_submodule(self._pool_name)
        handle = pool.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            self.model(self.prepare(x))
        finally:
            handle.remove()
        return captured[-1]


def _classifier(model: nn.Module) -> tuple[str, nn.Module | None]:
    """The last ``Linear`` (or 1x1 ``Conv2d``, as in SqueezeNet) with the class-score outputs."""
    found: tuple[str, nn.Module | None] = ("", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == IMAGENET_CLASSES:
            found = (name, module)
        elif isinstance(module, nn.Conv2d) and module.out_channels == IMAGENET_CLASSES:
            found = (name, module)
    return found


def _last_adaptive_pool(model: nn.Module) -> str | None:
    """Name of the model's last ``AdaptiveAvgPool2d`` (whose input is the final feature map)."""
    pools = [name for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    return pools[-1] if pools else None
