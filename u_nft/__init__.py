"""U-DiffusionNFT: DiffusionNFT with dense reward maps through a location variable U."""
__version__ = "0.1.0"
