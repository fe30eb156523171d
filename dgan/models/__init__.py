"""Networks: the UNet++ noise predictor G and the tau-conditioned PatchGAN D."""

from dgan.models.discriminator import PatchDiscriminator
from dgan.models.embeddings import ClassEmbedding, TimeEmbedding, sinusoidal_embedding
from dgan.models.generator import EncoderWeightsError, Generator, load_encoder_weights

__all__ = [
    "ClassEmbedding",
    "EncoderWeightsError",
    "Generator",
    "PatchDiscriminator",
    "TimeEmbedding",
    "load_encoder_weights",
    "sinusoidal_embedding",
]
