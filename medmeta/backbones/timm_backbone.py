"""``timm:<model>``: a timm (PyTorch Image Models) model as a backbone (extra ``timm``).

Built with ``num_classes=0``, timm's own way of removing the classifier: ``forward`` gives the
pooled (pre-logits) features. The input is normalised with the mean and std of the model's
``pretrained_cfg`` (a pretrained tag such as ``vit_small_patch16_224.augreg_in21k`` picks that
checkpoint's). Only names of timm's registry are taken: ``hf-hub:`` and ``local-dir:`` names
would read the network or files whenever the model is built (checkpoints included).
"""

from __future__ import annotations

from typing import Any

import torch

from medmeta.backbones.external import IMAGENET_MEAN, IMAGENET_STD, BackboneError, ExternalBackbone, ModelParts, first_line


class TimmBackbone(ExternalBackbone):
    """A timm model (``timm.create_model(name, num_classes=0, **model_kwargs)``)."""

    library = "timm"
    extra = "timm"

    @classmethod
    def model_names(cls) -> list[str]:
        return list(cls.import_library().list_models())

    @classmethod
    def check_model_name(cls, model_name: str) -> None:
        if ":" in model_name or "/" in model_name:
            raise BackboneError(
                f"timm:{model_name}: name the architecture from timm's registry (e.g. timm:vit_base_patch16_224) "
                "and give its checkpoint with --backbone-weights FILE; hub and folder sources are not built from"
            )
        super().check_model_name(model_name)

    @classmethod
    def is_model(cls, model_name: str) -> bool:
        return bool(cls.import_library().is_model(model_name))

    def build(self, model_name: str, model_kwargs: dict[str, Any]) -> ModelParts:
        model = self.import_library().create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        classifier = cfg.get("classifier") or ()
        return ModelParts(
            model=model,
            num_features=int(getattr(model, "head_hidden_size", None) or model.num_features),
            classifier=(classifier,) if isinstance(classifier, str) else tuple(classifier),
            mean=cfg.get("mean") or IMAGENET_MEAN,
            std=cfg.get("std") or IMAGENET_STD,
        )

    def has_pretrained(self) -> bool:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return any(cfg.get(key) for key in ("hf_hub_id", "url", "file", "state_dict"))

    def pretrained_state_dict(self) -> dict[str, torch.Tensor]:
        timm = self.import_library()
        try:
            with torch.random.fork_rng(devices=[]):  # building draws random initial weights first
                model = timm.create_model(self.model_name, pretrained=True, num_classes=0, **self.model_kwargs)
        except Exception as exc:
            raise BackboneError(
                f"cannot download the pretrained weights of {self.name} ({first_line(exc)}); offline? Save them on a "
                "connected machine (see docs/backbones.md) and give the file with --backbone-weights FILE"
            ) from None
        return dict(model.state_dict())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.prepare(x))
