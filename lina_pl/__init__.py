"""lina_pl: PyTorch Lightning experiments for autoregressive image generation with linear attention.

Import stays light: fla, deepspeed and the Lightning stack are imported only where they are used.
"""

__version__ = "0.1.0"
