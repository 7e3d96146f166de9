"""htd-toolkit: HeteroTissue-Diffuse (arXiv 2509.17847) from whole-slide images to the Hugging Face Hub."""

__version__ = "0.1.0"
