"""dgan: a Diffusion-GAN hybrid for medical image synthesis (README.md, ../shared/DESIGN.md)."""
import os

__version__ = "0.1.0"

# Offline by default (compute nodes have no internet): the one place these are set, before any
# dgan module imports smp/huggingface_hub or albumentations. An explicit setting still wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
