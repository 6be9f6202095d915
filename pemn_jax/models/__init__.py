"""Model families. Each takes its conv and dense layer classes as attributes, so ONE definition
builds the dense baseline (``layers.Conv`` / ``layers.Dense``) and the masked network
(``layers.MaskedConv`` / ``layers.MaskedDense``). ``REGISTRY`` maps ``model.name`` to each
family's ``ModelSpec`` (how it is built and validated from the config)."""

from pemn_jax.models import convmixer, mlp, resnet, vit
from pemn_jax.models.convmixer import ConvMixer
from pemn_jax.models.mlp import MLP
from pemn_jax.models.registry import ModelSpec
from pemn_jax.models.resnet import CifarResNet
from pemn_jax.models.vit import ViT

REGISTRY: dict[str, ModelSpec] = {
  'convmixer': convmixer.SPEC,
  'resnet': resnet.SPEC,
  'vit': vit.SPEC,
  'mlp': mlp.SPEC,
}

__all__ = ['REGISTRY', 'CifarResNet', 'ConvMixer', 'MLP', 'ModelSpec', 'ViT']
