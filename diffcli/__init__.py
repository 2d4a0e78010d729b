"""diffcli: a scriptable, reproducible command line for Stable Diffusion on diffusers."""

__version__ = "0.1.0"
