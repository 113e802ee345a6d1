"""GliDe with a CaPE: speculative decoding on fused Triton kernels."""

__version__ = "0.1.0"
