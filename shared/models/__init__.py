"""Encoders for spatial omics: the interface and the models that implement it."""

from fedspatial.shared.models.cell_autoencoder import CellAutoencoder
from fedspatial.shared.models.encoder import SpatialEncoderModel, build_model
from fedspatial.shared.models.gat_autoencoder import GATAutoencoder
from fedspatial.shared.models.neighbourhood_attention import NeighbourhoodAttention

__all__ = ["CellAutoencoder", "GATAutoencoder", "NeighbourhoodAttention", "SpatialEncoderModel", "build_model"]
