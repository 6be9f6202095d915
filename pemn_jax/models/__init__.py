"""Model families. Each takes its conv and dense layer classes as attributes, so ONE definition
builds the dense baseline (``layers.Conv`` / ``layers.Dense``) and the masked network
(``layers.MaskedConv`` / ``layers.MaskedDense``)."""

from pemn_jax.models.convmixer import ConvMixer
from pemn_jax.models.mlp import MLP
from pemn_jax.models.resnet import CifarResNet
from pemn_jax.models.vit import ViT

__all__ = ['ConvMixer', 'CifarResNet', 'MLP', 'ViT']
