"""The embed stage (stage.py), its image encoders (encoders.py) and their content-hash cache (cache.py)."""

from fashionmv_builder.stages.embed.encoders import ImageEncoder, image_encoder, product_vector, view_descriptor
from fashionmv_builder.stages.embed.stage import EmbedStage, encode_texts

__all__ = ["EmbedStage", "ImageEncoder", "encode_texts", "image_encoder", "product_vector", "view_descriptor"]
